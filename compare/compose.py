"""Compose the report from the matrix on disk: tables, plots, grids, CKA, configs and environment."""
from __future__ import annotations

import logging
from pathlib import Path

from compare import analysis, figures
from compare.config import CompareConfig
from compare.matrix import CELL_CONFIG, PROBE_FILE, Cell, largest_done
from compare.report import CELL_METRICS, COSTS, Report, Table, dig, environment, read_json
from finetune.artifacts import load_run, read_metrics
from synthvit.config import dump_yaml

log = logging.getLogger("synthvit.compare")


def _costs(cell: Cell) -> dict:
    metrics, probe = read_metrics(cell.folder) or {}, read_json(cell.folder / PROBE_FILE) or {}
    peak = probe.get("inference_peak_cuda_mb", probe.get("inference_peak_rss_mb"))
    params = probe.get("parameters", metrics.get("parameters"))
    return {"parameters": round(params / 1e6, 2) if params else None, "inference_peak_mb": peak,
            "gflops_per_512_tile": probe.get("gflops_per_512_tile"), "seconds_per_frame": probe.get(
                "seconds_per_frame"), "frames_per_s": probe.get("frames_per_s"),
            "train_peak_mb": metrics.get("train_peak_mb"), "train_wall_s": metrics.get("train_wall_s")}


def tradeoff_table(cells: list[Cell], frame: str) -> Table:
    largest = largest_done(cells)
    header = ["model", "init", "task", "train images"] + [c for c, _, _ in CELL_METRICS] + [
        c.format(frame=frame) for c, _, _ in COSTS]
    rows = []
    for name, cell in largest.items():
        m, costs = read_metrics(cell.folder), _costs(cell)
        rows.append([name, "synthetic" if cell.spec.init else "scratch", m.get("task"), cell.budget]
                    + [dig(m, p) for _, p, _ in CELL_METRICS] + [dig(costs, p) for _, p, _ in COSTS])
    better = [None] * 4 + [b for _, _, b in CELL_METRICS] + [b for _, _, b in COSTS]
    return Table(header, rows, better)


def cells_table(cells: list[Cell]) -> Table:
    header = ["model", "train images", "status"] + [c for c, _, _ in CELL_METRICS] + ["train s", "folder"]
    rows = []
    for c in cells:
        m = read_metrics(c.folder)
        rows.append([c.spec.name, c.budget, "done" if m else "FAILED (see log.txt)"]
                    + [dig(m, p) for _, p, _ in CELL_METRICS] + [dig(m, ("train_wall_s",)), str(c.folder)])
    return Table(header, rows, [None] * 3 + [None] * len(CELL_METRICS) + [None, None])


def series(cells: list[Cell]) -> dict:
    out: dict[str, dict[str, list]] = {"test mIoU": {}, "image AUROC": {}}
    for c in cells:
        m = read_metrics(c.folder)
        for metric, path in (("test mIoU", ("pixel", "miou")), ("image AUROC", ("image", "auroc"))):
            value = dig(m, path)
            out[metric].setdefault(c.spec.name, [])
            if value is not None:
                out[metric][c.spec.name].append((c.budget, value))
    return out


def budget_text(cfg: CompareConfig) -> str:
    f = cfg.finetune
    text = (f"Every cell trains **{f.steps} steps x batch {f.batch_size}** on **{f.crop_size} px {f.input}s** "
            f"(defect-centred share {f.defect_crop_prob}, loss {f.seg_loss}, AdamW lr {f.optim.lr} with "
            f"{f.optim.warmup_steps} warm-up steps and cosine decay, seed {f.seed}) and is tested on the same test "
            f"split at full resolution (tiles {f.tiling.tile or f.crop_size} px, overlap {f.tiling.overlap}). "
            f"Budgets are nested, seeded subsets of the train split: each smaller one is part of every larger one. "
            f"No ImageNet weights: CNNs and scratch ViTs start from random initialisation.")
    extra = [f"{m.name}: {', '.join(m.overrides)}" for m in cfg.models if m.overrides]
    return text + (f" Per-model overrides: {'; '.join(extra)}." if extra else " No per-model overrides.")


def _analysis(cfg: CompareConfig, cells: list[Cell], test_items, out: Path, report: Report) -> None:
    loaded = []
    for name, cell in largest_done(cells).items():
        run = load_run(cell.folder)
        loaded.append(analysis.Loaded(name, run.meta, run.model, cell.spec.init))
    if not loaded:
        return
    size = cfg.analysis_size or cfg.finetune.crop_size
    k = max(len(m.meta["seg_classes"]) for m in loaded)
    crops = analysis.pick_crops(test_items, cfg.finetune.in_chans, size, cfg.report_images, cfg.finetune.seed)
    if crops:
        preds = {m.name: analysis.predict_crops(m, crops) for m in loaded}
        figures.qualitative(crops, [c.mask for c in crops], preds, k, out / "qualitative.png")
        report.add("h2", "Qualitative grid")
        report.add("p", f"The same {len(crops)} test crops ({size} px, from the test split) for every model "
                        f"(trained on its largest budget): ground truth and predicted defect classes.")
        report.add("img", "qualitative.png", "qualitative grid")
        maps = {m.name: analysis.saliency_maps(m, crops) for m in loaded}
        figures.saliency_grid(crops, maps, out / "saliency.png")
        report.add("h2", "Where the models look")
        report.add("p", "ViTs: attention rollout (Abnar & Zuidema 2020: class-token attention through every block, "
                        "residual folded in). CNNs: Grad-CAM of the defect log-odds at the last convolutional stage "
                        "(captum). Each map is scaled to [0, 1] per image.")
        report.add("img", "saliency.png", "attention maps and Grad-CAM")
    _cka(cfg, loaded, test_items, size, out, report)


def _cka(cfg, loaded, test_items, size, out: Path, report: Report) -> None:
    if not cfg.cka_images:
        return
    crops = analysis.pick_crops(test_items, cfg.finetune.in_chans, size, cfg.cka_images, cfg.finetune.seed + 1,
                                defect_share=0.5)
    results = analysis.cka_matrices(loaded, crops, cfg.cka_batch)
    if not results:
        report.add("p", f"CKA skipped: fewer than {cfg.cka_batch} test crops of {size} px.")
        return
    report.add("h2", "Representation similarity (linear CKA)")
    report.add("p", f"After Raghu et al. 2021. Linear CKA with the unbiased minibatch HSIC estimator (Gram "
                    f"diagonals zeroed), {len(crops) // cfg.cka_batch} minibatches of {cfg.cka_batch} test crops of "
                    f"{size} px; ViT blocks via timm's forward_intermediates, ResNet residual blocks, HRNet stages.")
    for i, r in enumerate(results):
        name = f"cka_{i}_{r['a']}__{r['b']}.png"
        figures.cka_heatmap(r, out / name)
        report.add("img", name, f"{r['title']}: {r['a']} vs {r['b']}")


def compose(cfg: CompareConfig, cells: list[Cell], test_items, data_note: str) -> Report:
    out = Path(cfg.out_dir)
    report = Report("synthvit compare: ViT or CNN, and does synthetic pretraining pay?")
    report.add("p", data_note)
    report.add("h2", "Trade-offs (each model at its largest budget)")
    report.add("p", "Best value of each column in bold. Speed and memory from a fresh process per model on a "
                    f"{cfg.probe_size} frame (median of {cfg.probe_repeats}); training peak memory is the training "
                    "process's (CUDA allocated on GPU, resident set on CPU).")
    report.add("table", tradeoff_table(cells, cfg.probe_size))
    report.add("h2", "Equal budgets")
    report.add("p", budget_text(cfg))
    report.add("h2", "Data efficiency")
    figures.data_efficiency(series(cells), out / "data_efficiency.png")
    report.add("img", "data_efficiency.png", "metric against the number of real training images")
    report.add("h2", "Every cell")
    report.add("table", cells_table(cells))
    try:
        _analysis(cfg, cells, test_items, out, report)
    except Exception as e:  # a picture that cannot be drawn must not lose the tables
        log.exception("compare: analysis failed")
        report.add("p", f"Analysis failed: {type(e).__name__}: {e}")
    report.add("h2", "Machine and versions")
    report.add("table", Table(["", "value"], environment(), [None, None]))
    report.add("h2", "Configs")
    report.add("pre", "compare config", dump_yaml(cfg))
    for c in cells:
        path = c.folder / CELL_CONFIG
        if path.is_file():
            report.add("pre", f"{c.spec.name} n={c.budget} ({path})", path.read_text())
    return report

"""Compose the report from the matrix on disk: every cell read once into rows (``results.csv``), then tables,
differences, plots, grids, CKA, configs and environment."""
from __future__ import annotations

import logging
from pathlib import Path

from finetune.artifacts import load_run
from synthvit.compare import analysis, figures
from synthvit.compare.config import ZERO_SHOT, CompareConfig
from synthvit.compare.matrix import CELL_CONFIG, DOCTOR_DIR, Cell, reference_cells, zero_shot_reason
from synthvit.compare.report import Report, Table, environment, read_json
from synthvit.compare.results import RESULTS_FILE, Row, load_rows, write_results
from synthvit.compare.stats import NO_SEEDS, NOISE_RULE
from synthvit.compare.tables import (
    budget_unit_text,
    cells_table,
    difference_lines,
    groups,
    lever_table,
    series,
    tradeoff_table,
)
from synthvit.config import dump_yaml

log = logging.getLogger("synthvit.compare")


def weights_sentence(rows: list[Row]) -> str:
    """Where each row's initial weights came from (its finished cells' exports): "DeepLabV3+ from timm/resnet50.a1_in1k,
    vit-s from random"; a row whose cells disagree lists each."""
    by_name: dict[str, list[str]] = {}
    for r in rows:
        if r.done and r.weights:
            by_name.setdefault(r.name, [])
            if r.weights not in by_name[r.name]:
                by_name[r.name].append(r.weights)
    if not by_name:
        return ""
    parts = [f"{name} from {' / '.join(w)}" for name, w in by_name.items()]
    public = any(w != "random" for ws in by_name.values() for w in ws)
    return (" Initial weights: " + "; ".join(parts) + "." + ("" if public else " No public (ImageNet) weights: every "
            "model starts from random initialisation or a synthvit pretrain export (pretrained=true loads them)."))


def budget_text(cfg: CompareConfig, rows: list[Row] | None = None) -> str:
    f = cfg.finetune
    text = (f"Every cell trains **{f.steps} steps x batch {f.batch_size}** on **{f.crop_size} px {f.input}s** "
            f"(defect-centred share {f.defect_crop_prob}, loss {f.seg_loss}, AdamW lr {f.optim.lr} with "
            f"{f.optim.warmup_steps} warm-up steps and cosine decay) and is tested on the same test split at full "
            f"resolution (tiles {f.tiling.tile or f.crop_size} px, overlap {f.tiling.overlap}). Each cell runs once "
            f"per seed ({', '.join(map(str, cfg.seeds))}: initialisation, sample order and augmentation). Budgets "
            f"are nested subsets of the train split drawn with data_seed {f.data_seed}: each smaller one is part of "
            f"every larger one, and every model and seed of a budget trains on the same images.")
    extra = [f"{m.name}: {', '.join(m.overrides)}" for m in cfg.models if m.overrides]
    return text + weights_sentence(rows or []) + (
        f" Per-model overrides: {'; '.join(extra)}." if extra else " No per-model overrides.")


def zero_shot_text(cfg: CompareConfig) -> str:
    if not cfg.zero_shot:
        return f"No zero-shot cells (add `{ZERO_SHOT}` to budgets to evaluate each init export before training)."
    have = [m.name for m in cfg.models if not zero_shot_reason(cfg, m)]
    lack: dict[str, list[str]] = {}
    for m in cfg.models:
        if zero_shot_reason(cfg, m):
            lack.setdefault(zero_shot_reason(cfg, m), []).append(m.name)
    return (f"Zero-shot (budget `{ZERO_SHOT}`, the hollow diamonds left of the smallest budget): the init export's "
            f"dense head evaluated on the test split without real training, its pretrain classes collapsed onto "
            f"the data's; run once (seed-independent, no std). Zero-shot cells: {', '.join(have) or 'none'}."
            + "".join(f" None for {', '.join(names)} ({why})." for why, names in lack.items()))


def decision_note(rows: list[Row]) -> str:
    """Which defect decision the IoU and Dice figures were taken at."""
    rules = sorted({r.rule for r in rows if r.done and r.rule})
    return ("IoU and Dice are taken at each run's defect decision (rule: " + (", ".join(rules) or "none") + "), "
            "fitted after training on the run's own training frames, never on test pixels: a p(defect) threshold "
            "that undoes the defect-centred crop sampling. \"defect IoU @argmax\" is the same model at "
            "p(defect) > 0.5; pixel AP is threshold-free. The differences below use the decision's figures.")


def differences(rows: list[Row], report: Report, unit: str = "train images") -> None:
    report.add("h2", "Differences")
    lines = difference_lines(rows, unit)
    one_seed = all(sum(r.done for r in rs) <= 1 for (_, budget), rs in groups(rows).items() if budget != ZERO_SHOT)
    report.add("p", NOISE_RULE + (" " + NO_SEEDS if one_seed else ""))
    report.add("p", decision_note(rows))
    if lines:
        report.add("ul", lines)
    else:
        report.add("p", "No pair to compare: no model mixing synthetic sets beside the same model without them, no "
                        "synthetic-pretrained model with a scratch model of its architecture, and no ViT beside a "
                        "CNN, finished a budget together.")


def _analysis(cfg: CompareConfig, references: dict[str, Cell], test_items, out: Path, report: Report) -> dict:
    """Qualitative grid, saliency grid and CKA into ``report``; returns each model's saliency agreement."""
    loaded = []
    for name, cell in references.items():
        run = load_run(cell.folder)
        loaded.append(analysis.Loaded(name, run.meta, run.model, cell.spec.init))
    if not loaded:
        return {}
    size = cfg.analysis_size or cfg.finetune.crop_size
    k = max(len(m.meta.seg_classes) for m in loaded)
    crops = analysis.pick_crops(test_items, cfg.finetune.in_chans, size, cfg.report_images, cfg.finetune.data_seed)
    agreement = {}
    if crops:
        preds = {m.name: analysis.predict_crops(m, crops) for m in loaded}
        figures.qualitative(crops, [c.mask for c in crops], preds, k, out / "qualitative.png")
        report.add("h2", "Qualitative grid")
        report.add("p", f"The same {len(crops)} test crops ({size} px, from the test split) for every model "
                        f"(trained on its largest budget, first seed): ground truth and predicted defect classes.")
        report.add("img", "qualitative.png", "qualitative grid")
        maps = {m.name: analysis.saliency_maps(m, crops) for m in loaded}
        agreement = {name: analysis.saliency_agreement(m, crops) for name, (_, m) in maps.items()}
        figures.saliency_grid(crops, maps, out / "saliency.png")
        report.add("h2", "Where the models look")
        report.add("p", "ViTs: attention rollout (Abnar & Zuidema 2020: class-token attention through every block, "
                        "residual folded in). CNNs: Grad-CAM of the defect log-odds at the last convolutional stage "
                        "(captum). Each map is scaled to [0, 1] per image. The trade-off table's saliency AUROC "
                        "(pixel AUROC of the map against the defect mask) and saliency in mask (share of the map's "
                        f"mass inside it) are means over the {max(a.crops for a in agreement.values())} crops here "
                        f"that hold defects.")
        report.add("img", "saliency.png", "attention maps and Grad-CAM")
    _cka(cfg, loaded, test_items, size, out, report)
    return agreement


def _cka(cfg, loaded, test_items, size, out: Path, report: Report) -> None:
    if not cfg.cka_images:
        return
    crops = analysis.pick_crops(test_items, cfg.finetune.in_chans, size, cfg.cka_images, cfg.finetune.data_seed + 1,
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


def _looks(cfg: CompareConfig, references: dict[str, Cell], test_items, out: Path) -> tuple[Report, dict]:
    """The analysis part of the report, apart: a picture that cannot be drawn must not lose the tables."""
    looks = Report("")
    try:
        return looks, _analysis(cfg, references, test_items, out, looks)
    except Exception as e:
        log.exception("compare: analysis failed")
        looks.add("p", f"Analysis failed: {type(e).__name__}: {e}")
        return looks, {}


def _configs(cfg: CompareConfig, cells: list[Cell], report: Report) -> None:
    """The compare config and one cell config per model and budget (the other seeds' differ only in ``seed``)."""
    report.add("h2", "Configs")
    report.add("pre", "compare config", dump_yaml(cfg))
    for c in cells:
        path = c.folder / CELL_CONFIG
        if path.is_file() and c.seed == cfg.seeds[0]:
            more = "" if c.zero_shot or len(cfg.seeds) == 1 else ", the other seeds' differ only in seed"
            report.add("pre", f"{c.spec.name} {'zero-shot' if c.zero_shot else f'n={c.budget}'} ({path}{more})",
                       path.read_text())


def _doctor_section(out: Path, report: Report) -> None:
    """What ``synthvit doctor`` found in the data (``doctor/`` beside the report), with its picture."""
    doc = read_json(out / DOCTOR_DIR / "doctor.json")
    if doc is None:
        return
    problems, warnings = doc.get("problems", []), doc.get("warnings", [])
    report.add("h2", "The data (synthvit doctor)")
    verdict = "no problem found" if not problems else f"{len(problems)} problem(s), e.g. " + "; ".join(problems[:3])
    if warnings:
        verdict += f"; {len(warnings)} warning(s), e.g. " + "; ".join(warnings[:3])
    advice = "; ".join(f"{a['key']}={a['value']}" for a in doc.get("advice", [])) or "none"
    report.add("p", f"`{DOCTOR_DIR}/doctor.json`: {verdict}. Advice for the first model's settings (train split "
                    f"only): {advice}.")
    if (out / DOCTOR_DIR / "doctor.png").is_file():
        report.add("img", f"{DOCTOR_DIR}/doctor.png", "defect sizes per class (train split) against the model's "
                                                       "stride, the crop and the tile; example defects")


def compose(cfg: CompareConfig, cells: list[Cell], test_items, data_note: str) -> Report:
    out = Path(cfg.out_dir)
    references = reference_cells(cells)
    rows = load_rows(cells, references)
    write_results(rows, out / RESULTS_FILE)
    looks, agreement = _looks(cfg, references, test_items, out)
    report = Report("synthvit compare: ViT or CNN, and does synthetic data pay?")
    report.add("p", data_note)
    _doctor_section(out, report)
    unit = budget_unit_text(cfg.budget_unit)
    lever = lever_table(rows, unit)
    if lever is not None:
        report.add("h2", "The lever: synthetic sets mixed into the batches, per budget")
        report.add("p", "Each model mixing synthetic sets against the same model without them, at each budget both "
                        "finished: seed means, the difference (mixed - real only) with 2 x its noise, and the verdict "
                        "of the 2-std rule (better / worse / within noise). Pixel AP is threshold-free; defect IoU and "
                        "predicted / true defect pixels are at each run's fitted decision.")
        report.add("table", lever)
    report.add("h2", "Trade-offs (each model at its largest budget)")
    report.add("p", "Metrics and training costs: mean ± std over the seeds that finished (seeds column); best mean "
                    "of each column in bold. Speed and memory from a fresh process per model on a "
                    f"{cfg.probe_size} frame (median of {cfg.probe_repeats}); training peak memory is the training "
                    "process's (CUDA allocated on GPU, resident set on CPU). Decoder: the dense head of a timm "
                    "model (— for the CNN segmentation baselines, which bring their own).")
    report.add("table", tradeoff_table(rows, agreement, cfg.probe_size, unit))
    differences(rows, report, unit)
    report.add("h2", "Equal budgets")
    report.add("p", budget_text(cfg, rows))
    report.add("h2", "Data efficiency")
    figures.data_efficiency(series(rows), out / "data_efficiency.png")
    report.add("p", zero_shot_text(cfg))
    report.add("img", "data_efficiency.png", "metric against the number of real training images")
    report.add("h2", "Every cell")
    report.add("p", f"Mean ± std over seeds; `{RESULTS_FILE}` beside this report holds one row per cell and seed.")
    report.add("table", cells_table(rows, unit))
    report.blocks += looks.blocks
    report.add("h2", "Machine and versions")
    report.add("table", Table(["", "value"], environment(), [None, None]))
    _configs(cfg, cells, report)
    return report

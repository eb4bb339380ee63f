"""Which defect decision holds at few defects? Every rule, fitted on a run's *training* frames, scored on its test
frames, for every finished cell of a compare out_dir -- without running anything again.

Each finetune run keeps the p(defect) histograms of the training frames calibration scored
(``calibration_histogram.json``) and of the test frames evaluation scored (``test_histogram.json``). The rules fitted
here see the training histogram only (and the run's defective train-frame count and crop-sampling prior); the test
histogram only scores them: predicted / true defect pixels and defect IoU (binary: every defect class as one).

    .venv/bin/python benchmarks/bench_decision_rules.py runs/few-defects-deeppcb [--k 5 10 20 40] [--composites 128]

``--composites N`` also tries fitting on held-out synthetic composites: per budget, N copy-paste samples of the
budget's own train defects pasted into its own train frames at placements (and a seed) no training run drew
(``synthvit generate backend=copypaste``, cached under ``<out_dir>/_composites/``), scored by each cell's model: the
IoU-best threshold on those (``composite``), where a model has not memorised the defects' surroundings.

Prints one line per cell and a summary per (row, budget) and per rule: the mean ratio, the cells inside the 0.6-1.8
band the issue asks for, and the mean defect IoU.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from finetune.artifacts import CALIBRATION_HISTOGRAM, TEST_HISTOGRAM
from synthvit.io import SynthvitError
from synthvit.models.decision import DefectHistogram, shrunk_threshold

BAND = (0.6, 1.8)


def count_matched(train: DefectHistogram) -> float:
    """The threshold at which the training frames' predicted defect pixels equal their true ones."""
    above = (train.pos.flip(0).cumsum(0).flip(0) + train.neg.flip(0).cumsum(0).flip(0)).numpy()
    j = int(np.argmax(above <= float(train.pos.sum())))  # the first bin from below with no more than the truth
    return train.edge(j)


def fp_budget(train: DefectHistogram, share: float) -> float:
    """The lowest threshold at which the training frames' background pixels called defects are at most ``share`` x
    their true defect pixels: a rule read off the background scores alone (which transfer to unseen frames, where
    the memorised defects' scores do not)."""
    fp = train.neg.flip(0).cumsum(0).flip(0).numpy()
    j = int(np.argmax(fp <= share * float(train.pos.sum())))
    return train.edge(j)


def balanced(doc: dict) -> DefectHistogram | None:
    """The training histogram with defective and defect-free frames weighing the same (each kind's scored frames
    averaged): a defect prevalence of one frame in two, whatever the split's; None for a histogram without kinds."""
    groups = doc.get("groups") or {}
    if set(groups) != {"defective", "defect-free"}:
        return None
    out = DefectHistogram()
    for g in groups.values():
        h = DefectHistogram.from_json(g)
        out.pos += h.pos / g["frames"]
        out.neg += h.neg / g["frames"]
    return out


def rules(train: DefectHistogram, decision: dict, ks: list[float], doc: dict | None = None) -> dict[str, float]:
    best, _ = train.best()
    n = int(decision.get("prior", {}).get("defective_frames") or 0)
    out = {"threshold": best, "argmax": 0.5, "count-match": count_matched(train),
           "fp-0.25": fp_budget(train, 0.25), "fp-0.5": fp_budget(train, 0.5), "fp-1": fp_budget(train, 1.0)}
    if "logit-adjust" in decision.get("candidates", {}):
        out["logit-adjust"] = decision["candidates"]["logit-adjust"]
    for k in ks:
        out[f"shrink-k{k:g}"] = shrunk_threshold(best, n, k)
    even = balanced(doc or {})
    if even is not None:
        out["balanced"] = even.best()[0]
        for k in ks:
            out[f"balanced-shrink-k{k:g}"] = shrunk_threshold(out["balanced"], n, k)
    return out


COMPOSITE_SEED = 9001  # no generate job of a compare or of advise uses this seed


def composite_histogram(cell: Path, n: int, cache: Path) -> DefectHistogram:
    """The cell's model scored on ``n`` held-out copy-paste composites of its own train images (see the header)."""
    import numpy as np
    import torch

    import generate.schema  # noqa: F401  (registers format=shards)
    from finetune.artifacts import load_run, read_split
    from synthvit.data import load_real_data, to_array

    run = load_run(cell)
    train = sorted(i for i, s in (read_split(cell) or {}).items() if s == "train")
    folder = cache / cell.parent.name  # one set per budget: the cells of a budget share their train images
    if not (folder / "shards" / "_info.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "real_ids.txt").write_text("".join(f"{i}\n" for i in train))
        argv = [sys.executable, "-m", "synthvit", "generate", "backend=copypaste", f"out_dir={folder / 'shards'}",
                f"copypaste.data={run.cfg.data}", f"copypaste.test_fraction={run.cfg.test_fraction}",
                f"copypaste.data_seed={run.cfg.data_seed}", f"real_ids={folder / 'real_ids.txt'}",
                f"seed={COMPOSITE_SEED}", f"num_samples={n}", "image_size=256", "num_workers=1", "preview=0",
                "image_format=png", "copypaste.free_areas=false", "copypaste.match=false", "copypaste.elastic=0"]
        subprocess.run(argv, check=True, capture_output=True)
    data = load_real_data(str(folder / "shards"), "shards")
    predictor = run.predictor(torch.device("cpu"))
    hist = DefectHistogram()
    for item in data.items:
        with item.load() as im:
            image = to_array(im, run.cfg.in_chans)
        mask = np.asarray(item.mask((image.shape[1], image.shape[0])))
        hist.add(1 - predictor(image)["probs"][0], torch.from_numpy(mask.astype(np.int64)), 1.0)
    return hist


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path, help="a synthvit compare out_dir (or any folder of finetune runs)")
    ap.add_argument("--k", type=float, nargs="+", default=[5, 10, 20, 40], help="shrink weights to try (frames)")
    ap.add_argument("--composites", type=int, default=0, help="held-out copy-paste composites per budget (0: none)")
    args = ap.parse_args()
    cells = sorted(p.parent for p in args.out_dir.rglob(TEST_HISTOGRAM)
                   if (p.parent / CALIBRATION_HISTOGRAM).is_file() and "previous-" not in str(p))
    if not cells:
        raise SystemExit(f"no finished run with both {CALIBRATION_HISTOGRAM} and {TEST_HISTOGRAM} under {args.out_dir}")
    per_rule: dict[str, list[tuple[float, float]]] = defaultdict(list)
    per_group: dict[tuple[str, str, str], list[tuple[float, float]]] = defaultdict(list)
    print(f"{'cell':<44} {'rule':<22} {'threshold':>9} {'pred/true':>9} {'IoU':>7}")
    for cell in cells:
        try:
            doc = json.loads((cell / CALIBRATION_HISTOGRAM).read_text())
            train = DefectHistogram.from_json(doc)
            test = DefectHistogram.from_json(json.loads((cell / TEST_HISTOGRAM).read_text()))
        except (OSError, ValueError, KeyError, SynthvitError) as e:
            raise SystemExit(f"{cell}: unreadable {CALIBRATION_HISTOGRAM} or {TEST_HISTOGRAM} ({e}); remove the cell "
                             f"or run it again") from None
        decision = json.loads((cell / "export" / "config.json").read_text()).get("decision") or {}
        name = str(cell.relative_to(args.out_dir))
        parts = cell.parts
        row, budget = (parts[-3], parts[-2]) if len(parts) >= 3 else (name, "")
        found = rules(train, decision, args.k, doc)
        if args.composites:
            found["composite"] = composite_histogram(cell, args.composites, args.out_dir / "_composites").best()[0]
        for rule, t in found.items():
            ratio, iou = test.ratio_at(t), test.iou_at(t)
            per_rule[rule].append((ratio, iou))
            per_group[(row, budget, rule)].append((ratio, iou))
            print(f"{name:<44} {rule:<22} {t:>9.4f} {ratio:>9.3f} {iou:>7.4f}")
    print(f"\n{'row':<22} {'budget':<8} {'rule':<22} {'cells':>5} {'pred/true':>9} {'in band':>7} {'IoU':>7}")
    for (row, budget, rule), vals in sorted(per_group.items()):
        r = np.array(vals)
        inside = int(((r[:, 0] >= BAND[0]) & (r[:, 0] <= BAND[1])).sum())
        print(f"{row:<22} {budget:<8} {rule:<22} {len(r):>5} {r[:, 0].mean():>9.3f} {inside:>4}/{len(r):<2} "
              f"{r[:, 1].mean():>7.4f}")
    print(f"\n{'rule (all cells)':<22} {'cells':>5} {'median pred/true':>16} {'in band':>8} {'mean IoU':>9}")
    for rule, vals in per_rule.items():
        r = np.array(vals)
        inside = int(((r[:, 0] >= BAND[0]) & (r[:, 0] <= BAND[1])).sum())
        print(f"{rule:<22} {len(r):>5} {np.median(r[:, 0]):>16.3f} {inside:>4}/{len(r):<3} {r[:, 1].mean():>9.4f}")


if __name__ == "__main__":
    main()

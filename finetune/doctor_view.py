"""What ``synthvit doctor`` shows of its findings (:mod:`finetune.doctor`): the printed table and ``doctor.png``
(size histograms per defect class with the stride, crop and tile marked; example defects)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from synthvit.data import RealData, to_array


def table(report: dict) -> str:
    """The compact text summary the command prints."""
    sp, m = report["split"], report["model"]
    w, h = report["sizes"]["width"], report["sizes"]["height"]
    lines = [f"data      {report['data']} ({report['format']}): {report['images']} images, "
             f"{w.get('min', 0):.0f}-{w.get('max', 0):.0f} x {h.get('min', 0):.0f}-{h.get('max', 0):.0f} px, modes "
             + ", ".join(f"{k} {v}" for k, v in report["modes"].items()),
             f"split     {sp['source']}"]
    for name in ("train", "test"):
        s = sp[name]
        extra = f", {s['defective']} defective, {s['defect_free']} defect-free" if "defective" in s else ""
        labels = (", " + ", ".join(f"{k} {v}" for k, v in s["labels"].items())) if s.get("labels") else ""
        lines.append(f"  {name:7} {s['images']} images{extra}{labels}")
    lines.append(f"model     {m['name']} (stride {m['stride']}), crop {m['crop_size']}, tile {m['tile']}, "
                 f"defect_crop_prob {m['defect_crop_prob']}"
                 + (f": {100 * report['crop_hit_share']:.0f}% of training crops hold a defect"
                    if report["crop_hit_share"] is not None else ""))
    if report["classes"]:
        lines.append(f"{'class':14} {'train inst':>10} {'specks':>6} {'frames':>6} {'side p10/p50/p90':>18} "
                     f"{'thick p50':>9} {'<stride':>7} {'>crop':>6}")
        for name, c in report["classes"].items():
            s, t = c["side"], c["thickness"]
            sides = f"{s['p10']:.0f}/{s['median']:.0f}/{s['p90']:.0f}" if s else "-"
            lines.append(f"{name:14} {c['train_instances']:>10} {c['specks']:>6} {c['train_frames']:>6} {sides:>18} "
                         f"{t.get('median', float('nan')):>9.1f} "
                         f"{_pct(c['below_stride']):>7} {_pct(c['above_crop']):>6}")
    for a in report["advice"]:
        lines.append(f"advice    {a['key']}={a['value']} (now {a['current']}): {a['reason']}")
    for kind, key in (("PROBLEM", "problems"), ("WARNING", "warnings")):
        for p in report[key][:20]:
            lines.append(f"{kind:9} {p}")
        if len(report[key]) > 20:
            lines.append(f"{kind:9} ... and {len(report[key]) - 20} more (doctor.json)")
    n_problems, n_warnings = len(report["problems"]), len(report["warnings"])
    verdict = (f"{n_problems} problem(s): finetune would refuse the data" if n_problems else "fit") + (
        f", {n_warnings} warning(s)" if n_warnings else "")
    lines.append(f"verdict   {verdict} ({report['seconds']:.1f} s)")
    return "\n".join(lines)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def picture(report: dict, data: RealData, path: Path, in_chans: int = 3) -> None:
    """Size histograms per class (stride, crop and tile marked) and a grid of example train defects."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = [n for n, c in report["classes"].items() if c["train_instances"]]
    examples = report["_examples"]
    cols = 4
    rows = max(1, -(-len(examples) // cols))
    fig = plt.figure(figsize=(12, 3.2 + 2.4 * rows))
    grid = fig.add_gridspec(1 + rows, cols, height_ratios=[1.4] + [1] * rows)
    ax = fig.add_subplot(grid[0, :])
    m = report["model"]
    for name in classes:
        sides = report["_sides"].get(name, [])
        if sides:
            bins = np.logspace(0, np.log10(max(2, max(sides)) * 1.2), 30)
            ax.hist(sides, bins=bins, histtype="step", linewidth=1.6, label=f"{name} ({len(sides)})")
    top = ax.get_ylim()[1]
    marks = [(m["stride"], "stride", ":"), (m["crop_size"], "crop", "--"), (m["tile"], "tile", "-.")]
    for k, (value, label, style) in enumerate(marks):
        ax.axvline(value, color="k", linestyle=style, linewidth=1)
        ax.text(value, top * (0.95 - 0.1 * k), f" {label} {value}", fontsize=8, va="top")
    ax.set_xscale("log")
    ax.set_xlabel("defect bounding-box side, px (train split)")
    ax.set_ylabel("instances")
    ax.set_title(f"{report['data']}: defect sizes per class")
    if classes:
        ax.legend(fontsize=8, loc="upper left")
    by_id = {i.id: i for i in data.items}
    for n, (item_id, inst) in enumerate(examples):
        a = fig.add_subplot(grid[1 + n // cols, n % cols])
        item = by_id[item_id]
        with item.load() as im:
            image = to_array(im, in_chans)
        h, w = image.shape[:2]
        mask = item.mask((w, h))
        half = max(24, int(0.75 * max(inst["h"], inst["w"])))
        y0, x0 = max(0, inst["cy"] - half), max(0, inst["cx"] - half)
        crop, mcrop = image[y0:inst["cy"] + half, x0:inst["cx"] + half], mask[y0:inst["cy"] + half,
                                                                               x0:inst["cx"] + half]
        a.imshow(crop, cmap="gray" if crop.ndim == 2 else None)
        if mcrop.any():
            a.contour(mcrop > 0, levels=[0.5], colors="r", linewidths=0.8)
        a.set_title(f"{data.seg_classes[inst['class']]}: {inst['w']}x{inst['h']} px", fontsize=8)
        a.axis("off")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)



"""``synthvit doctor``: what a real-data folder holds and whether it fits the run that is planned on it, before any
training -- the format, sizes, split and classes, the defects' sizes against the model's stride, the crop and the
tile, how often training crops would see a defect, unreadable or suspicious files -- and settings that fit it.

It reads the config finetune reads (``synthvit doctor --config my-run.yaml`` checks the run as planned; any finetune
key can be overridden) and writes ``doctor.json`` and ``doctor.png`` (size histograms per class with the stride,
crop and tile marked; example defects). Exit code 0 when nothing is wrong, 1 when problems were found, so it can
gate a pipeline. Statistics that advice is drawn from come from the *train* split alone (the test split is counted
and checked for broken files, never measured): no setting is chosen on test data.

``finetune advise=true`` runs the same analysis first and applies the advice (crop size, tile, defect crop
probability, decoder, step budget); the run folder's ``advice.json`` says what it changed and why.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from scipy import ndimage

import generate.schema  # noqa: F401  (registers format=shards with synthvit.data)
from synthvit.data import (
    Item,
    RealData,
    has_defect,
    load_real_data,
    near_duplicates,
    pairs_record,
    pairs_text,
    problems_error,
    shown_size,
    split_ids,
    to_array,
)
from synthvit.data.formats import validate
from synthvit.io import SynthvitError, atomic_write_text
from synthvit.progress import progress_bar

log = logging.getLogger("synthvit.doctor")

DOCTOR_JSON, DOCTOR_PNG, ADVICE_FILE = "doctor.json", "doctor.png", "advice.json"
SAMPLED_CROPS = 2048  # training draws replayed (on masks) for the share of crops holding a defect
MIN_INSTANCES = 5  # a class with fewer labelled train instances is reported as a problem
MIN_CROP_HIT = 0.2  # fewer training crops than this holding a defect pixel is reported as a problem
EXAMPLES = 16
SPECK_AREA = 4  # components under this many pixels are counted as specks (mask noise?), not measured as defects
DRAWS_PER_DEFECT = 10  # defect-centred crops per defective train frame that the step advice aims for


def model_stride(cfg) -> tuple[int, bool]:
    """(the model's input stride: a ViT's patch, a CNN's output stride; whether it is a ViT), from a random-init
    build (no weights are read)."""
    from finetune.artifacts import build_model

    probe = dataclasses.replace(cfg, init="", weights="")
    model = build_model(probe, 2, 2)
    return max(1, model.input_multiple()), bool(getattr(model, "is_vit", False))


def instances(mask: np.ndarray) -> list[dict]:
    """Per connected component of one class: class id, area, bounding-box sides, thickness (twice the largest
    inscribed radius), centre."""
    out = []
    for c in np.unique(mask):
        if c == 0:
            continue
        labels, n = ndimage.label(mask == c)
        for k, sl in enumerate(ndimage.find_objects(labels), start=1):
            comp = labels[sl] == k
            small = int(comp.sum()) < SPECK_AREA
            radius = 0.5 if small else float(ndimage.distance_transform_edt(np.pad(comp, 1))[1:-1, 1:-1].max())
            ys, xs = np.nonzero(comp)
            out.append({"class": int(c), "area": int(comp.sum()), "h": sl[0].stop - sl[0].start,
                        "w": sl[1].stop - sl[1].start, "thickness": round(2 * radius, 2),
                        "cy": int(sl[0].start + ys.mean()), "cx": int(sl[1].start + xs.mean())})
    return out


def crop_hit_share(data: RealData, items: list[Item], cfg) -> float:
    """The share of training crops that hold a defect pixel: the run's own sampler replayed on the masks."""
    from finetune.train import replayed_windows

    if cfg.input != "crop":
        return float("nan")
    hits = [bool(window.any()) for window in replayed_windows(data, items, cfg, SAMPLED_CROPS)]
    return sum(hits) / len(hits) if hits else 0.0


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    q = np.percentile(values, [10, 50, 90])
    return {"min": float(min(values)), "p10": round(float(q[0]), 2), "median": round(float(q[1]), 2),
            "p90": round(float(q[2]), 2), "max": float(max(values))}


def examine(cfg, data: RealData, progress: bool = True) -> dict:
    """The doctor's findings for ``cfg`` (a FinetuneConfig): a JSON-able dict with ``problems`` and ``advice``."""
    t0 = time.perf_counter()
    problems: list[str] = []
    split = split_ids(data, cfg.test_fraction, cfg.data_seed)
    sizes, modes = [], Counter()
    per_item: dict[str, list[dict]] = {}
    suspicious: list[str] = []
    items = data.items  # readable ones: diagnose() and finetune's loader have listed the broken
    bar = progress_bar(total=len(items), desc="doctor", unit="img", disable=not progress)
    for item in items:
        with item.load() as im:
            w, h = shown_size(im)
            modes[f"{im.mode}"] += 1
        sizes.append((w, h))
        if item.mask is not None and data.has_masks:
            mask = item.mask((w, h))
            item.defect = bool(mask.any())
            if split.get(item.id) == "train":
                per_item[item.id] = instances(mask)
            if mask.size and np.count_nonzero(mask) == mask.size:
                suspicious.append(f"{item.source}: the mask is defect everywhere (inverted, or a wrong mask?)")
            labelled_good = item.label is not None and data.cls_classes and item.label == data.cls_classes[0] \
                and data.cls_classes[0].lower() in ("free", "good", "ok", "normal", "defect-free", "background")
            if labelled_good and mask.any():
                suspicious.append(f"{item.source}: labelled {item.label} but its mask holds defect pixels")
            if item.label is not None and not labelled_good and data.cls_classes \
                    and data.cls_classes[0].lower() in ("free", "good", "ok", "normal", "defect-free") \
                    and not mask.any():
                suspicious.append(f"{item.source}: labelled {item.label} but its mask is empty (all background)")
        bar.update(1)
    bar.close()
    problems += suspicious

    train = [i for i in items if split.get(i.id) == "train"]
    test = [i for i in items if split.get(i.id) == "test"]
    side: dict[str, dict] = {}
    for name, group in (("train", train), ("test", test)):
        entry: dict = {"images": len(group)}
        if data.has_labels:
            entry["labels"] = dict(Counter(i.label for i in group))
        if data.has_masks:
            n_def = sum(has_defect(i) for i in group)
            entry["defective"], entry["defect_free"] = n_def, len(group) - n_def
            entry["defect_free_share"] = round((len(group) - n_def) / max(1, len(group)), 4)
        side[name] = entry

    stride, is_vit = model_stride(cfg)
    tile = cfg.tiling.tile or cfg.crop_size
    classes: dict[str, dict] = {}
    by_class: dict[int, list[dict]] = defaultdict(list)
    if data.has_masks:
        for inst in (x for lst in per_item.values() for x in lst):
            by_class[inst["class"]].append(inst)
        frames_with = {c: sum(any(x["class"] == c for x in lst) for lst in per_item.values())
                       for c in range(1, len(data.seg_classes))}
        for c, name in enumerate(data.seg_classes):
            if c == 0:
                continue
            everything = by_class.get(c, [])
            group = [x for x in everything if x["area"] >= SPECK_AREA]
            sides = [max(x["h"], x["w"]) for x in group]
            classes[name] = {"train_instances": len(group), "train_frames": frames_with.get(c, 0),
                             "specks": len(everything) - len(group),
                             "area": _quantiles([x["area"] for x in group]), "side": _quantiles(sides),
                             "thickness": _quantiles([x["thickness"] for x in group]),
                             "below_stride": round(float(np.mean([s < stride for s in sides])), 4) if sides else None,
                             "above_crop": round(float(np.mean([s > cfg.crop_size for s in sides])), 4)
                             if sides else None}
            if len(group) < MIN_INSTANCES:
                problems.append(f"class {name}: {len(group)} labelled train instance(s) (< {MIN_INSTANCES}): too few "
                                f"to learn or to measure")
    pairs = near_duplicates(items, split, cfg.near_duplicate_distance) if cfg.near_duplicate_distance else []
    if pairs:
        problems.append(f"{len(pairs)} train/test near-duplicate pair(s) (pHash, Hamming <= "
                        f"{cfg.near_duplicate_distance} of 64 bits; train ~ test): {pairs_text(pairs)}: test content "
                        f"leaks into training")
    hit = crop_hit_share(data, train, cfg) if data.has_masks and train else float("nan")
    if hit == hit and hit < MIN_CROP_HIT:
        problems.append(f"only {100 * hit:.1f}% of training crops would hold a defect pixel (crop_size "
                        f"{cfg.crop_size}, defect_crop_prob {cfg.defect_crop_prob}); raise defect_crop_prob")
    report = {
        "data": str(cfg.data), "format": data.fmt, "images": len(data.items),
        "sizes": {"width": _quantiles([w for w, _ in sizes]), "height": _quantiles([h for _, h in sizes]),
                  "distinct": len(set(sizes))},
        "modes": dict(modes), "seg_classes": data.seg_classes, "cls_classes": data.cls_classes,
        "split": {"source": "splits.csv" if data.splits else f"seeded (test_fraction {cfg.test_fraction}, "
                                                               f"data_seed {cfg.data_seed})", **side},
        "model": {"name": cfg.model, "stride": stride, "vit": is_vit, "decoder": cfg.decoder,
                  "crop_size": cfg.crop_size, "tile": tile, "defect_crop_prob": cfg.defect_crop_prob},
        "classes": classes, "crop_hit_share": None if hit != hit else round(hit, 4),
        "near_duplicates": pairs_record(pairs, cfg.near_duplicate_distance, len(train), len(test))
        if cfg.near_duplicate_distance else None,
        "problems": problems,
    }
    report["advice"] = advise(report, cfg)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["_examples"] = _pick_examples(per_item, data)
    report["_sides"] = {data.seg_classes[c]: [max(x["h"], x["w"]) for x in group if x["area"] >= SPECK_AREA]
                        for c, group in by_class.items()} if data.has_masks else {}
    return report


def _pick_examples(per_item: dict[str, list[dict]], data: RealData) -> list[tuple[str, dict]]:
    """Up to :data:`EXAMPLES` train defects, spread over the classes (largest first within a class)."""
    by_class: dict[int, list[tuple[str, dict]]] = defaultdict(list)
    for item_id, lst in sorted(per_item.items()):
        for inst in lst:
            if inst["area"] >= SPECK_AREA:
                by_class[inst["class"]].append((item_id, inst))
    picks: list[tuple[str, dict]] = []
    rounds = [sorted(v, key=lambda t: -t[1]["area"]) for _, v in sorted(by_class.items())]
    for k in range(EXAMPLES):
        for group in rounds:
            if k < len(group) and len(picks) < EXAMPLES:
                picks.append(group[k])
    return picks


def _round_to(value: float, multiple: int, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, multiple * max(1, round(value / multiple)))))


def advise(report: dict, cfg) -> list[dict]:
    """Settings that fit the measured data, each ``{key, value, current, reason}`` (train statistics only)."""
    out: list[dict] = []
    model = report["model"]
    stride = model["stride"]
    sides = [s for c in report["classes"].values() for s in ([c["side"]["p90"]] if c["side"] else [])]
    thick = [c["thickness"]["median"] for c in report["classes"].values() if c["thickness"]]
    if sides:
        big = max(sides)  # the 90th-percentile defect side of the largest class
        step = 2 * stride  # an even token grid: DPT decoders halve it once (48 px at patch 16 fails, 64 does not)
        crop = _round_to(max(2 * big, 4 * stride, 64), step, step, 1024)
        short = min(report["sizes"]["height"].get("median", crop), report["sizes"]["width"].get("median", crop))
        capped = short >= step and step * int(short // step) < crop
        if capped:  # no larger than a typical frame's shorter side (smaller frames are zero-padded)
            crop = step * int(short // step)
        if crop != cfg.crop_size:
            out.append({"key": "crop_size", "value": crop, "current": cfg.crop_size,
                        "reason": f"the largest class's 90th-percentile defect side is {big:.0f} px: a crop of about "
                                  f"twice that holds a whole defect with context"
                                  + (f", capped by the median frame's shorter side ({short:.0f} px)" if capped
                                     else "")})
        if cfg.tiling.tile and cfg.tiling.tile < crop:
            out.append({"key": "tiling.tile", "value": 0, "current": cfg.tiling.tile,
                        "reason": f"tiles of {cfg.tiling.tile} px cut the defects the {crop} px crop is sized for; 0 "
                                  f"tiles as large as the training crop, the context the model was trained on"})
    if thick and model["vit"] and min(thick) < stride and cfg.decoder in ("auto", "linear"):
        out.append({"key": "decoder", "value": "dpt-skip", "current": cfg.decoder,
                    "reason": f"median defect thickness {min(thick):.1f} px < patch {stride}: a linear head predicts "
                              f"one label per {stride}x{stride} patch and cannot resolve it; dpt-skip upsamples with "
                              f"full-resolution skips"})
    if thick and model["vit"] and min(thick) < stride / 2:
        out.append({"key": "model", "value": "a patch-8 ViT or a conv-stem hybrid (e.g. vit_tiny_r_s16_p8_224)",
                    "current": cfg.model, "apply": False,
                    "reason": f"median defect thickness {min(thick):.1f} px is under half the patch ({stride}): "
                              f"a finer token grid sees it; not applied by advise=true (it changes the experiment)"})
    hit = report["crop_hit_share"]
    if hit is not None and hit < 0.5 and cfg.defect_crop_prob < 0.8:
        out.append({"key": "defect_crop_prob", "value": 0.8, "current": cfg.defect_crop_prob,
                    "reason": f"only {100 * hit:.0f}% of training crops would hold a defect pixel; 0.8 centres four "
                              f"in five crops on a defect (the decision is calibrated afterwards)"})
    n_def = report["split"]["train"].get("defective", 0)
    p = max(cfg.defect_crop_prob, 0.8 if any(a["key"] == "defect_crop_prob" for a in out) else 0.0)
    if n_def and p > 0:
        steps = int(min(20_000, np.ceil(DRAWS_PER_DEFECT * n_def / (cfg.batch_size * p) / 50) * 50))
        if cfg.steps < steps:
            out.append({"key": "steps", "value": steps, "current": cfg.steps,
                        "reason": f"{n_def} defective train frames at batch {cfg.batch_size} and defect_crop_prob "
                                  f"{p:g}: {cfg.steps} steps centre a crop on each about "
                                  f"{cfg.steps * cfg.batch_size * p / n_def:.1f} times; {steps} give each "
                                  f"{DRAWS_PER_DEFECT}"})
    return out


def apply_advice(cfg, advice: list[dict]):
    """``cfg`` with every applicable advice set (``model`` advice is never applied): (new cfg, the advice applied)."""
    applied = [a for a in advice if a.get("apply", True)]
    for a in applied:
        cfg = _replace(cfg, a["key"].split("."), a["value"])
    return cfg, applied


def _replace(node, path: list[str], value):
    head, rest = path[0], path[1:]
    return dataclasses.replace(node, **{head: _replace(getattr(node, head), rest, value) if rest else value})


# ---------------------------------------------------------------------------------------------------- output
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
    for p in report["problems"][:20]:
        lines.append(f"PROBLEM   {p}")
    if len(report["problems"]) > 20:
        lines.append(f"PROBLEM   ... and {len(report['problems']) - 20} more (doctor.json)")
    lines.append(f"verdict   {'fit' if not report['problems'] else str(len(report['problems'])) + ' problem(s)'} "
                 f"({report['seconds']:.1f} s)")
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


def diagnose(cfg, out: Path, data: RealData | None = None) -> dict:
    """Examine ``cfg``'s data (every broken file listed, the readable rest measured), write ``doctor.json`` and
    ``doctor.png`` into ``out``, print the table; the report (its ``problems`` decide the verdict)."""
    if data is None:
        data = load_real_data(cfg.data, cfg.format, check=False, max_pixels=cfg.max_pixels,
                              split_missing=cfg.split_missing)
    problems = validate(data)  # every broken file, as finetune would list them; the readable rest is examined
    broken = {p.split(":")[0] for p in problems}
    readable = dataclasses.replace(data, items=[i for i in data.items if i.source not in broken])
    if not readable.items:
        raise problems_error(data.root, problems)
    report = examine(cfg, readable)
    report["problems"] = problems + report["problems"]
    out.mkdir(parents=True, exist_ok=True)
    if data.has_masks and report["_examples"]:
        try:
            picture(report, readable, out / DOCTOR_PNG, cfg.in_chans)
        except Exception as e:  # the picture is a convenience: its failure must not hide the findings
            log.warning("doctor: could not draw %s (%s)", out / DOCTOR_PNG, e)
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    atomic_write_text(out / DOCTOR_JSON, json.dumps(public, indent=2))
    print(table(report))
    print(f"doctor: {out / DOCTOR_JSON}" + (f" and {out / DOCTOR_PNG}" if (out / DOCTOR_PNG).exists() else ""))
    return report


def run(cfg) -> Path:
    """``synthvit doctor``: print the table, write doctor.json and doctor.png; problems make the exit code 1."""
    if not cfg.data:
        from synthvit.config import ConfigError
        raise ConfigError("data: give the real-data folder, e.g. data=../shared/datasets/magnetic-tile")
    out = Path(cfg.report_dir or Path("doctor") / Path(str(cfg.data).rstrip("/")).name)
    report = diagnose(cfg, out)
    if report["problems"]:
        raise SynthvitError(f"{len(report['problems'])} problem(s) found in {cfg.data}; see {out / DOCTOR_JSON}")
    return out

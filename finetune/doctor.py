"""``synthvit doctor``: what a real-data folder holds and whether it fits the run that is planned on it, before any
training -- the format, sizes, split and classes, the defects' sizes against the model's stride, the crop and the
tile, how often training crops would see a defect, unreadable or suspicious files -- and settings that fit it.

It reads the config finetune reads (``synthvit doctor --config my-run.yaml`` checks the run as planned; any finetune
key can be overridden) and writes ``doctor.json`` and ``doctor.png`` (size histograms per class with the stride,
crop and tile marked; example defects). Its exit code gates a pipeline: 1 exactly where ``finetune`` with the same
keys would refuse the data (``problems``: the files it rejects, read by the same check,
:func:`synthvit.data.check_items`, and :func:`refusals`), else 0; the findings finetune trains through (suspicious
masks, too few instances, crops that rarely see a defect, near-duplicates across the split) are ``warnings``,
printed and recorded, and make the exit code 1 only with ``strict=true``.
Statistics that advice is drawn from come from the *train* split alone (the test split is counted and checked for
broken files, never measured): no setting is chosen on test data.

``finetune advise=true`` runs the same analysis first and applies the advice (crop size, tile, defect crop
probability, decoder, step budget; at <= :data:`FEW_DEFECTS` defective train frames for a ViT, the few-defect recipe:
copy-paste of the run's own train defects built into the run folder and mixed in); keys the user gave win over
advice; the run folder's ``advice.json`` says what it changed, why, and what the user's keys overrode.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from scipy import ndimage

import generate.schema  # noqa: F401  (registers format=shards with synthvit.data)
from finetune.artifacts import ADVISED_SET
from finetune.doctor_view import picture, table
from synthvit.data import (
    Item,
    RealData,
    budget_subset,
    check_items,
    has_defect,
    load_real_data,
    near_duplicates,
    pairs_record,
    pairs_text,
    problems_error,
    shown_size,
    split_ids,
)
from synthvit.io import SynthvitError, atomic_write_text, dumps_json, writable_dir
from synthvit.progress import progress_bar

log = logging.getLogger("synthvit.doctor")

DOCTOR_JSON, DOCTOR_PNG, ADVICE_FILE = "doctor.json", "doctor.png", "advice.json"
SAMPLED_CROPS = 2048  # training draws replayed (on masks) for the share of crops holding a defect
MIN_INSTANCES = 5  # a class with fewer labelled train instances is reported as a problem
MIN_CROP_HIT = 0.2  # fewer training crops than this holding a defect pixel is reported as a problem
EXAMPLES = 16
SPECK_AREA = 4  # components under this many pixels are counted as specks (mask noise?), not measured as defects
DRAWS_PER_DEFECT = 10  # defect-centred crops per defective train frame that the step advice aims for
# The few-defect recipe (docs/finetune.md, BENCHMARKS.md): at most FEW_DEFECTS defective train frames, a ViT (or
# hybrid) mixes copy-paste of the run's own train defects into its batches. The set is built from the run's train
# split into <out_dir>/ADVISED_SET with these generate keys.
FEW_DEFECTS = 10
RECIPE_SET = {"num_samples": 400, "image_size": 256, "copypaste.max_instances": 3}
RECIPE_MIX = {"synthetic_share": 0.5, "synthetic_mode": "share"}
# frames whose pixels are this share (near) black or white are binarised: copy-paste pastes their pixels as they are
BILEVEL_SHARE, BILEVEL_TOLERANCE = 0.95, 16  # near: within 16 grey levels (a JPEG-saved binary frame rings a little)
BILEVEL_FRAMES = 8


def model_stride(cfg) -> tuple[int, bool]:
    """(the model's input stride: a ViT's patch, a CNN's output stride; whether it is a ViT), from a random-init
    build (no weights are read)."""
    from finetune.artifacts import build_model

    probe = dataclasses.replace(cfg, init="", weights="", pretrained=False)
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
    """The doctor's findings for ``cfg`` (a FinetuneConfig): a JSON-able dict with ``warnings`` (what finetune
    trains through: suspicious masks, too few instances, crops that rarely see a defect, near-duplicates across the
    split), ``problems`` (what it refuses: :func:`diagnose` adds them) and ``advice``."""
    t0 = time.perf_counter()
    problems: list[str] = []  # warnings: finetune trains through every one of these
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

    report_bilevel = bilevel(train, cfg.in_chans)
    if data.has_masks and (cfg.train_limit or cfg.defective_limit):  # the subset the run will train on
        used = budget_subset(data, train, cfg.train_limit, cfg.defective_limit, cfg.data_seed)
        side["train"]["defective_used"] = sum(has_defect(i) for i in used)
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
        "classes": classes, "crop_hit_share": None if hit != hit else round(hit, 4), "bilevel": report_bilevel,
        "near_duplicates": pairs_record(pairs, cfg.near_duplicate_distance, len(train), len(test))
        if cfg.near_duplicate_distance else None,
        "problems": [],
        "warnings": problems,
    }
    report["advice"] = advise(report, cfg)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    report["_examples"] = _pick_examples(per_item, data)
    report["_sides"] = {data.seg_classes[c]: [max(x["h"], x["w"]) for x in group if x["area"] >= SPECK_AREA]
                        for c, group in by_class.items()} if data.has_masks else {}
    return report


def bilevel(items: list[Item], in_chans: int) -> bool:
    """Whether the train frames are binarised (DeepPCB-like: >= 95 % of the pixels of each of the first few frames
    within 16 grey levels of black or white): copy-paste then pastes pixels as they are (matching a patch's margin to
    a flat spot greys it)."""
    from synthvit.data import to_array

    if not items:
        return False
    for item in items[:BILEVEL_FRAMES]:
        with item.load() as im:
            a = to_array(im, 1 if in_chans == 1 else 3)
        if np.count_nonzero((a <= BILEVEL_TOLERANCE) | (a >= 255 - BILEVEL_TOLERANCE)) < BILEVEL_SHARE * a.size:
            return False
    return True


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
    n_def = defective_used(report, cfg)
    p = max(cfg.defect_crop_prob, 0.8 if any(a["key"] == "defect_crop_prob" for a in out) else 0.0)
    if n_def and p > 0:
        steps = int(min(20_000, np.ceil(DRAWS_PER_DEFECT * n_def / (cfg.batch_size * p) / 50) * 50))
        if cfg.steps < steps:
            out.append({"key": "steps", "value": steps, "current": cfg.steps,
                        "reason": f"{n_def} defective train frames at batch {cfg.batch_size} and defect_crop_prob "
                                  f"{p:g}: {cfg.steps} steps centre a crop on each about "
                                  f"{cfg.steps * cfg.batch_size * p / n_def:.1f} times; {steps} give each "
                                  f"{DRAWS_PER_DEFECT}"})
    out += _few_defect_advice(report, cfg, out)
    return out


def defective_used(report: dict, cfg) -> int:
    """The defective train frames the run trains on: those of its ``train_limit`` / ``defective_limit`` subset of
    the train split (the split's, without a limit)."""
    return report["split"]["train"].get("defective_used", report["split"]["train"].get("defective", 0))


def _few_defect_advice(report: dict, cfg, advice: list[dict]) -> list[dict]:
    """The few-defect recipe: copy-paste of the run's own train defects mixed into a ViT's batches when it trains on
    at most :data:`FEW_DEFECTS` defective frames (the evidence: docs/finetune.md)."""
    n = defective_used(report, cfg)
    if not n or n > FEW_DEFECTS or not report["model"]["vit"] or cfg.task != "seg" or cfg.synthetic or not cfg.steps:
        return []
    folder = str(Path(cfg.out_dir).absolute() / ADVISED_SET)  # the run's config.yaml names it from any directory
    crop = max([cfg.crop_size] + [a["value"] for a in advice if a["key"] == "crop_size"])
    short = min(report["sizes"]["height"].get("median", 256), report["sizes"]["width"].get("median", 256))
    side = int(max(32, min(max(RECIPE_SET["image_size"], 2 * crop), short)) // 16 * 16)  # within a frame
    build = {**RECIPE_SET, "image_size": side, "copypaste.match": not report.get("bilevel", False)}
    out = [{"key": "synthetic", "value": [folder], "current": list(cfg.synthetic), "build": build,
            "reason": f"{n} defective train frame(s) (<= {FEW_DEFECTS}): a ViT gains from copy-paste of its own "
                      f"train defects into its own defect-free train frames mixed into every batch (pixel AP and "
                      f"image AUROC on held-out real sets, docs/finetune.md); the set ({RECIPE_SET['num_samples']} "
                      f"samples of {side} px"
                      + (", pixels pasted as they are: the frames are binarised" if report.get("bilevel") else "")
                      + f") is built from the run's train split into {folder}; test images are never drawn"}]
    for key, value in RECIPE_MIX.items():
        if getattr(cfg, key) != value:
            out.append({"key": key, "value": value, "current": getattr(cfg, key),
                        "reason": f"the few-defect recipe mixes with {key}={value}"})
    return out


def apply_advice(cfg, advice: list[dict], given: frozenset[str] | set[str] = frozenset()):
    """``cfg`` with every applicable advice set (``model`` advice is never applied; a key in ``given`` -- the user's
    own -- wins over its advice): (new cfg, the advice applied, the advice the user's keys overrode)."""
    applied, overridden = [], []
    for a in advice:
        if not a.get("apply", True):
            continue
        if a["key"] in given:
            overridden.append({**a, "yours": _get(cfg, a["key"].split("."))})
            continue
        cfg = _replace(cfg, a["key"].split("."), a["value"])
        applied.append(a)
    return cfg, applied, overridden


def _get(node, path: list[str]):
    for key in path:
        node = getattr(node, key)
    return node


def _replace(node, path: list[str], value):
    head, rest = path[0], path[1:]
    return dataclasses.replace(node, **{head: _replace(getattr(node, head), rest, value) if rest else value})


# ---------------------------------------------------------------------------------------------------- output
def refusals(cfg, data: RealData) -> list[str]:
    """What else finetune refuses in ``data`` before training (its files are :func:`check_items`'s): a task it
    cannot serve, a split without train images, synthetic sets or an init export that drew on its test split or
    whose classes do not map."""
    from finetune.synthetic import check_leak, load_synthetic
    from synthvit.models.export import read_export_meta

    out = []
    try:
        data.check_task(cfg.task)
    except SynthvitError as e:
        out.append(str(e))
    split = split_ids(data, cfg.test_fraction, cfg.data_seed)
    test_ids = {i for i, side in split.items() if side == "test"}
    if not any(side == "train" for side in split.values()):
        out.append(f"no training images in {cfg.data} (split: {len(test_ids)} test)")
    try:
        if cfg.synthetic:
            load_synthetic(cfg.synthetic, data, test_ids, cfg.synthetic_classes)
        if cfg.init:
            used = read_export_meta(cfg.init).extra.get("real_ids") or {}
            check_leak(f"init export {cfg.init}", {k: set(v) for k, v in used.items()}, data, test_ids)
    except SynthvitError as e:
        out.append(str(e))
    return out


def diagnose(cfg, out: Path, data: RealData | None = None) -> dict:
    """Examine ``cfg``'s data (every broken file listed, the readable rest measured), write ``doctor.json`` and
    ``doctor.png`` into ``out``, print the table; the report (its ``problems`` decide the verdict)."""
    if data is None:
        data = load_real_data(cfg.data, cfg.format, check=False, max_pixels=cfg.max_pixels,
                              split_missing=cfg.split_missing)
    problems, broken = check_items(data, data.items)  # every broken file, as finetune lists them
    readable = dataclasses.replace(data, items=[i for i in data.items if i.id not in broken])
    if not readable.items:
        raise problems_error(data.root, problems)
    report = examine(cfg, readable)  # the readable rest, measured
    report["problems"] = problems + refusals(cfg, readable)  # what finetune refuses: the exit code
    writable_dir(out, "report_dir")
    if data.has_masks and report["_examples"]:
        try:
            picture(report, readable, out / DOCTOR_PNG, cfg.in_chans)
        except Exception as e:  # the picture is a convenience: its failure must not hide the findings
            log.warning("doctor: could not draw %s (%s)", out / DOCTOR_PNG, e)
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    atomic_write_text(out / DOCTOR_JSON, dumps_json(public, indent=2))
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
        raise SynthvitError(f"{len(report['problems'])} problem(s) found in {cfg.data}: finetune would refuse the "
                            f"data; see {out / DOCTOR_JSON}")
    if report["warnings"] and cfg.strict:
        raise SynthvitError(f"{len(report['warnings'])} warning(s) in {cfg.data} (strict=true); see "
                            f"{out / DOCTOR_JSON}")
    return out

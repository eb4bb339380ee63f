"""``synthvit finetune`` / ``evaluate`` / ``predict``; the run folder they write and read is
:mod:`finetune.artifacts`."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import logging
import os
import shutil
import time
from pathlib import Path

import torch

import generate.schema  # noqa: F401  (registers format=shards with synthvit.data)
from finetune.artifacts import (
    CALIBRATION_HISTOGRAM,
    CONFIG_FILE,
    EXPORT_DIR,
    METRICS_FILE,
    NEAR_DUPLICATES_FILE,
    SPLIT_FILE,
    SYNTHETIC_FILE,
    TEST_HISTOGRAM,
    RunMetrics,
    build_model,
    commit_export,
    load_run,
    write_metrics,
)
from finetune.calibrate import fit_decision
from finetune.config import CalibrateConfig, CalibrateRunConfig, EvaluateConfig, FinetuneConfig, PredictConfig
from finetune.deploy import is_deploy_folder, load_deployed
from finetune.doctor import ADVICE_FILE, apply_advice, defective_used, examine
from finetune.evaluate import Predictor, check_tiling, evaluate
from finetune.predict import MaskRule, check_earlier_run, failure_message, input_files, output_keys, predict_files
from finetune.runfolder import claim, read_train_summary, run_split, write_train_summary
from finetune.synthetic import build_copypaste, check_leak, load_synthetic
from finetune.train import batch_layout, check_resumable, train
from finetune.video import is_video, predict_video
from synthvit import __version__
from synthvit.checkpoint import CKPT_DIR, resolve_resume
from synthvit.config import ConfigError, dump_yaml, given_keys
from synthvit.data import (
    NearDuplicate,
    RealData,
    budget_subset,
    describe_split,
    load_real_data,
    near_duplicates,
    pairs_record,
    pairs_text,
    set_pixel_cap,
    split_ids,
)
from synthvit.io import SynthvitError, atomic_write_bytes, atomic_write_text, dumps_json, writable_dir
from synthvit.lock import folder_lock
from synthvit.models import (
    ExportMeta,
    Heads,
    class_groups,
    read_export_meta,
    stats_meta,
    write_export,
    write_export_meta,
)
from synthvit.models.decision import DefectHistogram
from synthvit.models.hub import weights_comment
from synthvit.progress import progress_bar
from synthvit.ranks import Ranks
from synthvit.training import make_accelerator, peak_memory_mb, resolve_device

log = logging.getLogger("synthvit.finetune")


def _select(data: RealData, cfg: FinetuneConfig, split: dict[str, str]):
    train_items = [i for i in data.items if split[i.id] == "train"]
    test_items = [i for i in data.items if split[i.id] == "test"]
    train_items = budget_subset(data, train_items, cfg.train_limit, cfg.defective_limit, cfg.data_seed)
    if not train_items:
        raise SynthvitError(f"no training images in {cfg.data} (split: {len(test_items)} test)")
    return train_items, test_items


def _meta(cfg: FinetuneConfig, data: RealData, stats: dict) -> ExportMeta:
    heads = Heads.parse(cfg.task)
    return ExportMeta(model=cfg.model, img_size=cfg.crop_size, in_chans=cfg.in_chans, heads=heads, input=cfg.input,
                      num_classes=len(data.cls_classes) if heads.has_cls else len(data.seg_classes),
                      class_names=data.cls_classes, seg_classes=data.seg_classes if heads.has_seg else [],
                      cls_classes=data.cls_classes if heads.has_cls else [], **stats, init=cfg.init,
                      extra={"synthvit_version": __version__})


def advised(cfg: FinetuneConfig, data) -> tuple[FinetuneConfig, dict]:
    """``cfg`` with the doctor's advice applied (``advise=true``), measured on the train split; the record of
    advice.json: what changed, and the advice the user's own keys overrode."""
    report = examine(cfg, data, progress=False)
    new, applied, overridden = apply_advice(cfg, report["advice"], given_keys(cfg))
    for a in applied:
        log.info("advise: %s=%s (was %s): %s", a["key"], a["value"], a["current"], a["reason"])
    for a in overridden:
        log.info("advise (yours kept): %s=%s, not the advised %s: %s", a["key"], a["yours"], a["value"], a["reason"])
    for a in report["advice"]:
        if not a.get("apply", True):
            log.info("advise (not applied): %s: %s", a["key"], a["reason"])
    if not applied:
        log.info("advise: the config already fits the data; nothing changed")
    return new, {"applied": applied, "overridden": overridden,
                 "defective_train_frames": defective_used(report, cfg)}


def run(cfg: FinetuneConfig) -> Path:
    if not cfg.data:
        raise ConfigError("data: give the real-data folder, e.g. data=../shared/datasets/magnetic-tile")
    main = os.environ.get("RANK", "0") == "0"  # a launched job's first process holds the folder for all of them
    with folder_lock(cfg.out_dir) if main else contextlib.nullcontext(Path(cfg.out_dir)) as run_dir:
        run_dir.mkdir(parents=True, exist_ok=True)
        return _run(cfg, run_dir, main)


def _run(cfg: FinetuneConfig, run_dir: Path, main: bool) -> Path:
    data, applied = None, None
    if cfg.advise:  # before the resume check: a resumed run re-derives the same advice from the same data
        data = load_real_data(cfg.data, cfg.format, max_pixels=cfg.max_pixels, split_missing=cfg.split_missing)
        cfg, applied = advised(cfg, data)
    if claim(cfg, run_dir, main) == "evaluate":  # this config's export, stopped while evaluating
        if main:
            _evaluate_export(cfg, run_dir)
        return run_dir
    ckpt = resolve_resume(cfg.resume, run_dir) if cfg.steps else None
    if ckpt is not None:
        check_resumable(cfg, ckpt)  # a checkpoint of another config stops the run before anything is written
    if data is None:
        data = load_real_data(cfg.data, cfg.format, max_pixels=cfg.max_pixels, split_missing=cfg.split_missing)
    data.check_task(cfg.task)
    split = _train_split(cfg, data, run_dir, ckpt)
    train_items, test_items = _select(data, cfg, split)
    advised_set = next((a for a in (applied or {}).get("applied", []) if a.get("build")), None)
    if advised_set is not None and main:  # the few-defect recipe: the copy-paste set of this run's own train images
        build_copypaste(cfg, train_items, Path(advised_set["value"][0]), advised_set["build"])
    torch.manual_seed(cfg.seed)
    model = _build(cfg, data)
    if cfg.init:  # the pretraining export's record of the real images its shards drew on (none: procedural only)
        used = read_export_meta(cfg.init).extra.get("real_ids") or {}
        check_leak(f"init export {cfg.init}", {k: set(v) for k, v in used.items()}, data, {i.id for i in test_items})
    if cfg.evaluate or cfg.steps:
        check_tiling(model, cfg)  # a tile size evaluation or predict could not run is refused before training
    frozen = model.freeze_early(cfg.freeze_blocks)
    acc = make_accelerator(cfg.precision)
    ranks = Ranks.of(acc)
    if advised_set is not None:
        acc.wait_for_everyone()  # the first process built the advised set
    synthetic = _synthetic(cfg, data, {i.id for i in test_items})
    if ranks.is_main:
        atomic_write_text(run_dir / CONFIG_FILE, dump_yaml(cfg) + weights_comment(model.weights_source))
        if applied is not None:
            atomic_write_text(run_dir / ADVICE_FILE, dumps_json(applied, indent=2))
        _write_split(run_dir, split, {i.id for i in train_items})
        if synthetic is not None:
            atomic_write_text(run_dir / SYNTHETIC_FILE, dumps_json({"share": cfg.synthetic_share,
                                                                    "mode": cfg.synthetic_mode,
                                                                    "sets": synthetic.records}, indent=2) + "\n")
        for line in describe_split(data, split):
            log.info("%s", line)
        log.info("%s: %d train images (of %d), %d test; %s frozen parameters", cfg.data, len(train_items),
                 sum(v == "train" for v in split.values()), len(test_items), f"{frozen:,}")
        _check_near_duplicates(cfg, run_dir, train_items, test_items)
    mean, std = model.input_stats(cfg.in_chans)
    if cfg.steps:
        summary = train(cfg, acc, model, data, train_items, mean.to(acc.device), std.to(acc.device), run_dir, ckpt,
                        synthetic)
        if summary.pop("stopped"):
            log.info("stopped at step %d of %d with a checkpoint; run again (resume=auto) to continue", cfg.stop_at,
                     cfg.steps)
            return run_dir
    else:
        summary = _zero_shot_summary(model, acc.device)
    model = summary.pop("model")
    meta = _meta(cfg, data, stats_meta(mean, std))
    if ranks.is_main:
        if cfg.steps:  # zero-shot evaluates the export as it is: no training labels
            meta.decision = fit_decision(Predictor(model, meta, acc.device, cfg.tiling), data, train_items, cfg,
                                         synthetic, record=run_dir / CALIBRATION_HISTOGRAM)
        write_train_summary(run_dir, summary)
        commit_export(run_dir, lambda folder: write_export(model, folder, meta))
        shutil.rmtree(run_dir / CKPT_DIR, ignore_errors=True)  # the export is the product; checkpoints were a means
        if cfg.evaluate and test_items:
            _evaluate_run(cfg, model, meta, acc.device, data, test_items, summary, run_dir)
    return run_dir


def _synthetic(cfg: FinetuneConfig, data: RealData, test_ids: set[str]):
    """The mixed-in synthetic sets (None without any), checked before training: no test image drawn on, every
    class mapped."""
    if not cfg.synthetic:
        return None
    pool = load_synthetic(cfg.synthetic, data, test_ids, cfg.synthetic_classes)
    real, syn = batch_layout(cfg, pool)
    log.info("synthetic: %d samples of %d set(s) mixed in: %d synthetic + %d real samples per batch (%s)", len(pool),
             len(pool.records), syn, real, "added to the real ones" if cfg.synthetic_mode == "add" else
             "in place of real ones")
    return pool


def _check_near_duplicates(cfg: FinetuneConfig, run_dir: Path, train_items, test_items) -> list[NearDuplicate]:
    """Warn once about the train/test pairs whose perceptual hashes differ in at most ``near_duplicate_distance``
    bits (the train images this run uses against the test split) and record them all in near_duplicates.json.
    Zero-shot (``steps=0``) trains on nothing: no check."""
    path = run_dir / NEAR_DUPLICATES_FILE
    if not cfg.near_duplicate_distance or not cfg.steps or not test_items:
        path.unlink(missing_ok=True)  # an earlier run's record would speak for this one
        return []
    start = time.perf_counter()
    bar = progress_bar(total=len(train_items) + len(test_items), desc="near-duplicates", unit="img")
    split = {**{i.id: "train" for i in train_items}, **{i.id: "test" for i in test_items}}
    pairs = near_duplicates(train_items + test_items, split, cfg.near_duplicate_distance, bar)
    bar.close()
    record = pairs_record(pairs, cfg.near_duplicate_distance, len(train_items), len(test_items))
    atomic_write_text(path, dumps_json(record, indent=2) + "\n")
    if pairs:
        log.warning("near-duplicates across the split: %d train/test pair(s) whose pHash differs in <= %d of 64 bits "
                    "(train ~ test): %s. A resized, re-encoded or shifted copy of a test image in training leaks "
                    "test content into it and flatters the test metrics; look at them and put each pair on one side "
                    "(splits.csv). All are in %s", len(pairs), cfg.near_duplicate_distance, pairs_text(pairs), path)
    else:
        log.info("near-duplicates across the split: none (pHash, <= %d of 64 bits; %d train x %d test images, "
                 "%.1f s)", cfg.near_duplicate_distance, len(train_items), len(test_items),
                 time.perf_counter() - start)
    return pairs


def _build(cfg: FinetuneConfig, data: RealData):
    """The model to train; for ``steps=0`` (zero-shot) the export's model with its classes summed into the data's."""
    seg_k, cls_k = max(len(data.seg_classes), 1), max(len(data.cls_classes), 1)
    if cfg.steps:
        return build_model(cfg, seg_k, cls_k)
    if not cfg.init or cfg.task != "seg":
        raise ConfigError("steps=0 (zero-shot) evaluates a pretrain export's dense head as it is: give "
                          "init=EXPORT_FOLDER and task=seg")
    meta = read_export_meta(cfg.init)
    if not meta.heads.has_seg:
        raise SynthvitError(f"init: {cfg.init} was pretrained with objective={meta.heads.objective}: it has no "
                            f"dense head to evaluate zero-shot; pretrain with objective=seg or cls+seg")
    return build_model(cfg, seg_k, cls_k, class_groups=class_groups(meta.class_names, data.seg_classes))


def _zero_shot_summary(model, device) -> dict:
    peak, kind = peak_memory_mb(device)
    return {"steps": 0, "train_images": 0, "train_wall_s": 0.0, "train_peak_mb": peak, "train_peak_kind": kind,
            "train_images_per_s": 0.0, "zero_shot": True, "model": model.to(device)}


def _write_split(run_dir: Path, split: dict[str, str], used: set[str]) -> None:
    """``split.csv``: id,split for every image; train images outside a train_limit are ``unused``."""
    rows = sorted((i, "unused" if s == "train" and i not in used else s) for i, s in split.items())
    buf = io.StringIO()
    csv.writer(buf).writerows([("id", "split"), *rows])
    atomic_write_text(run_dir / SPLIT_FILE, buf.getvalue())


def _evaluate_run(cfg, model, meta, device, data, test_items, summary: dict, run_dir: Path) -> None:
    bar = progress_bar(total=len(test_items), desc="evaluate", unit="img")
    hist = DefectHistogram() if meta.heads.has_seg and data.has_masks else None
    metrics = evaluate(Predictor(model, meta, device, cfg.tiling), data, test_items, cfg.in_chans, bar, hist)
    bar.close()
    if hist is not None:
        atomic_write_text(run_dir / TEST_HISTOGRAM, dumps_json(hist.to_json()) + "\n")
    metrics.update(summary, model_name=cfg.model, init=cfg.init or None, task=cfg.task,
                   parameters=sum(p.numel() for p in model.parameters()))
    write_metrics(run_dir, RunMetrics.from_json(metrics, run_dir / METRICS_FILE))
    log.info("test: %s", _headline(metrics))


def _headline(m: dict) -> str:
    parts = []
    if "pixel" in m:
        parts.append(f"mIoU {m['pixel']['miou']:.4f}, defect AP {m['pixel']['defect_ap']:.4f}")
    if m.get("image", {}).get("auroc") is not None:
        parts.append(f"image AUROC {m['image']['auroc']:.4f}")
    if "classification" in m:
        parts.append(f"accuracy {m['classification']['accuracy']:.4f}")
    parts.append(f"{m['speed']['seconds_per_image']} s/image")
    return ", ".join(parts)


def _train_split(cfg: FinetuneConfig, data: RealData, run_dir: Path, ckpt) -> dict[str, str]:
    """id -> train or test for a run about to train: a resumed one keeps the split its split.csv records (images
    added since are left out, a recorded one gone is an error); a new one draws it (:func:`split_ids`)."""
    if ckpt is not None:
        split = run_split(run_dir, data, cfg.data)
        if split is not None:
            return {i: "train" if s == "unused" else s for i, s in split.items()}
    return split_ids(data, cfg.test_fraction, cfg.data_seed)


def _run_split(run, data: RealData, folder: str = "") -> dict[str, str]:
    """id -> train/test/unused of a finished run: the split its split.csv records (:func:`finetune.runfolder.run_split`:
    never drawn again; images added since are not in it; ``folder``: other data than the run's), else (a run
    folder of a synthvit that wrote none) the seeded split of its config."""
    split = run_split(run.folder, data, run.cfg.data, folder or None)
    if split is not None:
        return split
    log.warning("%s has no %s (an older synthvit's run): its seeded split is drawn again from its config",
                run.folder, SPLIT_FILE)
    return split_ids(data, run.cfg.test_fraction, run.cfg.data_seed)


def _evaluate_export(cfg: FinetuneConfig, run_dir: Path) -> None:
    """metrics.json of a run whose export exists (it stopped while evaluating): the export on the run's test split."""
    run = load_run(run_dir)
    data = _run_data(run)
    test_items = [i for i in data.items if _run_split(run, data).get(i.id) == "test"]
    if not test_items:
        raise SynthvitError(f"out_dir: {run_dir} holds a finished run (no test images to evaluate); give "
                            f"overwrite=true to replace it, or another out_dir")
    device = resolve_device()
    _evaluate_run(cfg, run.model.to(device), run.meta, device, data, test_items, read_train_summary(run_dir), run_dir)


def _run_data(run, folder: str = "") -> RealData:
    fcfg = run.cfg
    return load_real_data(folder or fcfg.data, fcfg.format, max_pixels=fcfg.max_pixels,
                          split_missing=fcfg.split_missing)


def run_evaluate(cfg: EvaluateConfig) -> Path:
    run = load_run(cfg.checkpoint)
    key = "out_dir" if cfg.out_dir else "checkpoint"
    with folder_lock(cfg.out_dir or cfg.checkpoint, key) as out:  # no finetune replaces the run while it is scored
        return _evaluate_split(cfg, run, out)


def _evaluate_split(cfg: EvaluateConfig, run, out: Path) -> Path:
    data = _run_data(run, cfg.data)
    split = {i: "train" if s == "unused" else s for i, s in _run_split(run, data, cfg.data).items()}
    items = [i for i in data.items if i.id in split and (cfg.split == "all" or split[i.id] == cfg.split)]
    _say_decision(run.meta, cfg.checkpoint)
    bar = progress_bar(total=len(items), desc="evaluate", unit="img")
    metrics = evaluate(run.predictor(resolve_device()), data, items, run.cfg.in_chans, bar)
    bar.close()
    atomic_write_bytes(out / f"metrics_{cfg.split}.json", dumps_json(metrics, indent=2).encode())
    log.info("%s: %s", cfg.split, _headline(metrics))
    return out


def _say_decision(meta: ExportMeta, checkpoint: str) -> None:
    if meta.decision is None and meta.heads.has_seg:
        log.warning("%s has no fitted defect decision (made before synthvit 0.2, or calibrate.rule=argmax): masks are "
                    "argmax, which over-paints defects after defect-centred training; `synthvit calibrate "
                    "checkpoint=%s` fits one from the run's training frames", checkpoint, checkpoint)


def run_calibrate(cfg: CalibrateRunConfig) -> Path:
    """Fit (again) the defect decision of a finished run from the frames it trained on, into its export."""
    run = load_run(cfg.checkpoint)
    if not run.meta.heads.has_seg:
        raise SynthvitError(f"checkpoint: {cfg.checkpoint} has no dense head (task={run.cfg.task}): nothing to "
                            f"calibrate")
    writable_dir(run.folder / EXPORT_DIR, "checkpoint")  # before the fit: the decision is written into the export
    with folder_lock(run.folder, "checkpoint"):
        return _calibrate(cfg, run)


def _calibrate(cfg: CalibrateRunConfig, run) -> Path:
    data = _run_data(run)
    split = _run_split(run, data)
    train = [i for i in data.items if split.get(i.id) == "train"]  # the frames it trained on (never test, nor unused)
    fcfg = dataclasses.replace(run.cfg, calibrate=CalibrateConfig(rule=cfg.rule, max_images=cfg.max_images,
                                                                     max_pixels=cfg.max_pixels))
    test_ids = {i for i, s in split.items() if s == "test"}
    synthetic = load_synthetic(fcfg.synthetic, data, test_ids, fcfg.synthetic_classes) if fcfg.synthetic else None  # its crops count too
    decision = fit_decision(run.predictor(resolve_device()), data, train, fcfg, synthetic,
                            record=run.folder / CALIBRATION_HISTOGRAM)
    write_export_meta(run.folder / EXPORT_DIR, dataclasses.replace(run.meta, decision=decision))
    log.info("calibrate: %s/%s holds the decision (%s); `synthvit evaluate checkpoint=%s` scores it",
             cfg.checkpoint, EXPORT_DIR, f"{decision.rule} {decision.threshold:.4f}" if decision else "argmax",
             cfg.checkpoint)
    return run.folder


def run_predict(cfg: PredictConfig) -> Path:
    if not cfg.input:
        raise ConfigError("input: give an image file or a folder, a glob pattern or a .txt/.lst list of paths "
                          "(--input PATH)")
    out = Path(cfg.out)
    video = is_video(cfg.input)
    if not video:
        files, base = input_files(cfg.input, skip=out)
        keys = output_keys(files, base)
    check_earlier_run(out, cfg.checkpoint, cfg.threshold, cfg.overwrite)
    if is_deploy_folder(cfg.checkpoint):  # a synthvit export folder: its graphs in ONNX Runtime or OpenVINO
        run = load_deployed(cfg.checkpoint)
    else:
        run = load_run(cfg.checkpoint)
    set_pixel_cap(run.max_pixels)
    rule = MaskRule.of(run.meta, cfg.threshold)
    if cfg.threshold == "auto":
        _say_decision(run.meta, cfg.checkpoint)
    log.info("predict: masks at %s", f"p(defect) > {rule.threshold:.4f} ({rule.name})" if rule.threshold is not None
             else "argmax")
    writable_dir(out, "out")
    atomic_write_text(out / CONFIG_FILE, dump_yaml(cfg))
    if video:
        summary = predict_video(run.predictor(resolve_device()), cfg.input, out, run.meta, rule, cfg.realtime,
                                cfg.video_overlay)
        if summary["ok"] == 0:
            raise SynthvitError(f"input: {cfg.input}: no frame predicted ({summary['frames']} read, "
                                f"{summary['broken']} broken; {summary['ended']}); see {out / summary['jsonl']}")
        return out
    done = predict_files(run.predictor(resolve_device()), files, out, run.meta, rule, keys, cfg.overwrite)
    log.info("predict: %d frames predicted, %d done before (skipped), %d unreadable -> %s", done["predicted"],
             done["skipped"], len(done["failed"]), out)
    if done["failed"]:
        raise SynthvitError(failure_message(done["failed"], len(files), out))
    return out

"""Full-resolution evaluation: tiled predictions of every test image, torchmetrics on pixels and images.

Pixels: per-class IoU, mIoU, Dice (F1) per class at the run's fitted defect decision (its ``rule`` and
``threshold``: :mod:`synthvit.models.decision`; argmax for exports made before decisions existed), the same at
argmax under ``argmax``, every fitted rule's defect IoU under ``rules``, the predicted-to-true defect pixel ratio
of each, and pixel AP of the defect probability (1 - p(background)), binned so memory stays constant. Images: AUROC and AP of the image defect score (the highest pixel defect
probability, or 1 - p(good) of the classifier) against "defective" (a non-good label, else a non-empty mask);
accuracy and confusion matrix of the classifier. Also seconds per image at full resolution and peak memory.
"""
from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
from PIL import Image
from torchmetrics.classification import (
    BinaryAUROC,
    BinaryAveragePrecision,
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassJaccardIndex,
)

from finetune.tiling import Tiler, auto_tile_batch, inference_dtype, tile_streams
from synthvit.config import ConfigError
from synthvit.data import GOOD_NAMES, Item, RealData, to_array
from synthvit.io import SynthvitError
from synthvit.models import ExportMeta, class_map, meta_stats
from synthvit.models.decision import DefectHistogram, top_class
from synthvit.training import has_attention, peak_memory_mb, set_attention

PIXEL_STRIDE = 4  # pixel AP on every 4th pixel of every 4th row: a 4K frame still gives 0.5 M pixels


class NonFiniteOutput(SynthvitError):
    """The model's output for a frame holds NaN or infinity: it has no score. ``evaluate`` and ``calibrate`` stop
    with it (a NaN score would rank as anything: image AUROC 1.0 from NaN scores); ``predict`` lists the frame as
    failed with it and goes on."""


class Predictor:
    """Full-resolution inference of one model on uint8 frames: tiled segmentation, whole-image classification."""

    def __init__(self, model, meta: ExportMeta, device, tiling):
        tile = tiling.tile or meta.img_size
        self.tiler = Tiler(tile, tiling.overlap, tiling.batch_size or auto_tile_batch(tile, has_attention(model)))
        check_input_size(model, self.tiler.tile)
        if self.tiler.tile != meta.img_size:  # a ViT resamples its position embeddings: on its own copy
            model = copy.deepcopy(model)
            model.set_input_size(self.tiler.tile)
        self.model, self.meta, self.device = model.eval(), meta, device
        self.mean, self.std = meta_stats(meta, device)
        self.autocast = inference_dtype(tiling.precision, torch.device(device))
        self.streams = tiling.streams or tile_streams(torch.device(device))
        self.attention = set_attention(self.model, tiling.attention, device)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    @torch.no_grad()  # not inference_mode: autocast caches a weight's low-precision copy only outside it
    def __call__(self, image: np.ndarray) -> dict:
        """``probs`` (K, H, W) and/or ``cls_probs`` (K,), and the image defect ``score`` of a uint8 frame (H, W[, C]);
        :class:`NonFiniteOutput` where the model's output is not finite (the caller names the frame)."""
        out = self._predict(image)
        cls_ok = "cls_probs" not in out or bool(torch.isfinite(out["cls_probs"]).all())
        if not (math.isfinite(out["score"]) and cls_ok):  # NaN anywhere in probs[0] makes the score NaN
            raise NonFiniteOutput("the model's output is not finite (NaN or infinity), so there is no defect score; "
                                  "its weights overflow on this frame: train again with a lower optim.lr or "
                                  "optim.clip_grad > 0")
        return out

    def _predict(self, image: np.ndarray) -> dict:
        frame = torch.from_numpy(np.array(image[..., None] if image.ndim == 2 else image)).permute(
            2, 0, 1).to(self.device)
        out = {}
        if self.meta.heads.has_seg:
            out["probs"] = self._seg(frame, len(self.meta.seg_classes))
            out["score"] = float(1 - out["probs"][0].min())
        if self.meta.heads.has_cls:
            s = self.meta.img_size
            small = torch.from_numpy(np.array(Image.fromarray(image).resize((s, s), Image.BILINEAR)))
            small = (small[..., None] if small.ndim == 2 else small).permute(2, 0, 1)[None].float().to(self.device)
            out["cls_probs"] = self._cls(small)
            if "probs" not in out:
                out["score"] = float(1 - out["cls_probs"][0]) if self._has_good() else float(out["cls_probs"].max())
        return out

    def _seg(self, frame: torch.Tensor, k: int) -> torch.Tensor:
        """(K, H, W) class probabilities of a (C, H, W) frame, tiled and blended."""
        return self.tiler(frame, lambda t: self.model(t)["seg"].float().softmax(1), k, transform=self.normalise,
                          autocast_dtype=self.autocast, streams=self.streams)

    def _cls(self, small: torch.Tensor) -> torch.Tensor:
        """(K,) classifier probabilities of a frame resized to the crop size (1, C, s, s), float 0..255."""
        return self.model(self.normalise(small))["cls"].float().softmax(1)[0]

    def _has_good(self) -> bool:
        names = self.meta.cls_classes
        return bool(names) and names[0].lower() in GOOD_NAMES


def check_input_size(model, tile: int, key: str = "tiling.tile") -> None:
    """A tile side the model cannot take is an error naming the sides it can (before any frame is read)."""
    m = model.input_multiple()
    if tile % m:
        lower, upper = tile // m * m, (tile // m + 1) * m
        raise ConfigError(f"{key}={tile}: {type(model).__name__} takes tiles whose side is a multiple of {m} (its "
                          f"{'patch' if model.is_vit else 'output'} stride); use {key}={upper}"
                          + (f" or {lower}" if lower else ""))


def check_tiling(model, cfg) -> None:
    """Refuse, before training, a tiling that evaluation could not run: the tile side must suit the model, and a
    copy of it must predict one tile of that size (a ViT's position embeddings resampled to it)."""
    tile = cfg.tiling.tile or cfg.crop_size
    check_input_size(model, tile, "tiling.tile" if cfg.tiling.tile else "crop_size")  # the key the user set
    if tile == cfg.crop_size:
        return  # training itself runs at this size
    probe = copy.deepcopy(model).eval()
    try:
        probe.set_input_size(tile)
        with torch.inference_mode():
            probe(torch.zeros(1, cfg.in_chans, tile, tile))
    except Exception as e:  # whatever the architecture raises: refuse now, not after training
        raise ConfigError(f"tiling.tile={tile}: {cfg.model} trained on crop_size={cfg.crop_size} crops cannot "
                          f"predict {tile}-px tiles ({type(e).__name__}: {e}); use tiling.tile=0 (the crop size)") \
            from None


class RuleScore:
    """IoU and Dice per class and the predicted defect pixels of one decision (threshold None: argmax)."""

    def __init__(self, k: int, threshold: float | None):
        # one process, even inside a distributed job; inputs are class ids by construction (masks are checked when
        # read), and torchmetrics' input checks cost ~1 s per metric on a 4K frame: 10x the update itself
        local = dict(sync_on_compute=False, validate_args=False)
        self.threshold = threshold
        self.iou = MulticlassJaccardIndex(k, average="none", **local)
        self.dice = MulticlassF1Score(k, average="none", **local)
        self.predicted = 0

    def update(self, probs: torch.Tensor, target: torch.Tensor, defect_class: torch.Tensor | None = None) -> None:
        pred = class_map(probs, self.threshold, defect_class)[None]
        self.iou.update(pred, target[None])
        self.dice.update(pred, target[None])
        self.predicted += int(torch.count_nonzero(pred))

    def summary(self, names: list[str], true_defect: int) -> dict:
        iou, dice = self.iou.compute(), self.dice.compute()
        return {"iou": dict(zip(names, iou.tolist())), "miou": float(iou.mean()), "dice": dict(zip(names, dice.tolist())),
                "mdice": float(dice.mean()), "defect_iou": float(iou[1:].mean()) if len(iou) > 1 else None,
                "defect_pixel_ratio": round(self.predicted / true_defect, 4) if true_defect else None}


def defective(data: RealData, item: Item, mask: np.ndarray | None) -> int:
    if item.label is not None and data.cls_classes and data.cls_classes[0].lower() in GOOD_NAMES:
        return int(item.label != data.cls_classes[0])
    return int(mask is not None and bool(mask.any()))


def evaluate(predictor: Predictor, data: RealData, items: list[Item], in_chans: int, progress=None,
             histogram: DefectHistogram | None = None) -> dict:
    """The metrics of ``items``; ``histogram``: filled with every scored pixel's p(defect) by defect/background."""
    meta, dev = predictor.meta, torch.device("cpu")
    seg_k, cls_k = len(meta.seg_classes), len(meta.cls_classes)
    local = dict(sync_on_compute=False)  # evaluation runs on one process, even inside a distributed job
    decision = meta.decision
    # one scorer per distinct threshold (the decision is one of its candidates), named by every rule that uses it
    thresholds = {"decision": decision.threshold if decision else None, "argmax": None,
                  **(decision.candidates if decision else {})}
    scorers = {t: RuleScore(seg_k, t) for t in dict.fromkeys(thresholds.values())}
    rules = {name: scorers[t] for name, t in thresholds.items()}
    pix = dict(rules=rules, scorers=list(scorers.values()), ap=BinaryAveragePrecision(thresholds=200, **local),
               true=0) if seg_k else {}
    img = dict(auroc=BinaryAUROC(**local), ap=BinaryAveragePrecision(**local))
    cls = dict(acc=MulticlassAccuracy(cls_k, average="micro", **local), cm=MulticlassConfusionMatrix(cls_k, **local)) \
        if cls_k and meta.heads.has_cls else {}
    scores, labels, seconds = [], [], []
    for item in items:
        with item.load() as im:
            image = to_array(im, in_chans)
        h, w = image.shape[:2]
        mask = item.mask((w, h)) if (item.mask is not None and seg_k) else None
        t = time.perf_counter()
        try:
            out = predictor(image)
        except NonFiniteOutput as e:  # a NaN score would rank anywhere: no metric from it
            if progress is not None:
                progress.close()  # before the error is printed
            raise NonFiniteOutput(f"test frame {item.source}: {e}") from None
        seconds.append(time.perf_counter() - t)
        if mask is not None and "probs" in out:
            target = torch.from_numpy(mask.astype(np.int64))
            probs = out["probs"].to(dev)
            defect_class = top_class(probs[1:]) + 1 if seg_k > 2 else None  # once for every rule
            for score in pix["scorers"]:
                score.update(probs, target, defect_class)
            pix["true"] += int(np.count_nonzero(mask))
            if histogram is not None:
                histogram.add(1 - probs[0], target, 1.0)
            sub = (slice(None, None, PIXEL_STRIDE), slice(None, None, PIXEL_STRIDE))
            pix["ap"].update((1 - out["probs"][0])[sub].flatten().to(dev), (target[sub] > 0).flatten().int())
        if cls and item.label is not None and "cls_probs" in out:
            y = torch.tensor([data.label_index(item)])
            cls["acc"].update(out["cls_probs"][None].to(dev), y)
            cls["cm"].update(out["cls_probs"][None].to(dev), y)
        scores.append(out["score"])
        labels.append(defective(data, item, mask))
        if progress is not None:
            progress.update(1)
    return _summarise(pix, img, cls, scores, labels, seconds, meta, len(items))


def _summarise(pix, img, cls, scores, labels, seconds, meta, n) -> dict:
    result: dict = {"images": n}
    if pix and pix["rules"]["argmax"].iou.update_count:
        scores_at = {name: r.summary(meta.seg_classes, pix["true"]) for name, r in pix["rules"].items()}
        decision = meta.decision
        primary = scores_at.pop("decision")
        argmax = scores_at.pop("argmax")
        result["pixel"] = {"rule": decision.rule if decision else "argmax",
                           "threshold": decision.threshold if decision else None,
                           **{k: primary[k] for k in ("iou", "miou", "dice", "mdice", "defect_pixel_ratio")},
                           "argmax": {k: argmax[k] for k in ("iou", "miou", "dice", "mdice", "defect_pixel_ratio")},
                           "rules": {name: {"threshold": pix["rules"][name].threshold, "defect_iou": s["defect_iou"],
                                            "miou": s["miou"], "defect_pixel_ratio": s["defect_pixel_ratio"]}
                                     for name, s in scores_at.items()},
                           "defect_pixels": pix["true"], "defect_ap": float(pix["ap"].compute())}
    s, y = torch.tensor(scores, dtype=torch.float32), torch.tensor(labels)
    if len(set(labels)) == 2:
        result["image"] = {"auroc": float(img["auroc"](s, y)), "ap": float(img["ap"](s, y)),
                           "defective": int(y.sum()), "good": int((1 - y).sum())}
    else:
        result["image"] = {"auroc": None, "ap": None, "note": "needs both defective and good test images"}
    if cls and cls["acc"].update_count:
        result["classification"] = {"accuracy": float(cls["acc"].compute()), "classes": meta.cls_classes,
                                    "confusion_matrix": cls["cm"].compute().tolist()}
    result["speed"] = {"seconds_per_image": round(float(np.mean(seconds)), 4) if seconds else None,
                       "peak_rss_mb": peak_memory_mb(torch.device("cpu"))[0]}
    if torch.cuda.is_available():
        result["speed"]["peak_cuda_mb"] = peak_memory_mb(torch.device("cuda"))[0]
    return result

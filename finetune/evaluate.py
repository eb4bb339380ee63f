"""Full-resolution evaluation: tiled predictions of every test image, torchmetrics on pixels and images.

Pixels: per-class IoU, mIoU, Dice (F1) per class, and pixel AP of the defect probability (1 - p(background)),
binned so memory stays constant. Images: AUROC and AP of the image defect score (the highest pixel defect
probability, or 1 - p(good) of the classifier) against "defective" (a non-good label, else a non-empty mask);
accuracy and confusion matrix of the classifier. Also seconds per image at full resolution and peak memory.
"""
from __future__ import annotations

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

from finetune.tiling import Tiler
from synthvit.data import GOOD_NAMES, Item, RealData, to_array
from synthvit.models import ExportMeta, meta_stats
from synthvit.training import peak_memory_mb

PIXEL_STRIDE = 4  # pixel AP on every 4th pixel of every 4th row: a 4K frame still gives 0.5 M pixels


class Predictor:
    """Full-resolution inference of one model on uint8 frames: tiled segmentation, whole-image classification."""

    def __init__(self, model, meta: ExportMeta, device, tiling):
        self.model, self.meta, self.device = model.eval(), meta, device
        self.mean, self.std = meta_stats(meta, device)
        self.tiler = Tiler(tiling.tile or meta.img_size, tiling.overlap, tiling.batch_size)
        self.autocast = torch.bfloat16 if device.type == "cuda" else None

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def __call__(self, image: np.ndarray) -> dict:
        frame = torch.from_numpy(np.array(image[..., None] if image.ndim == 2 else image)).permute(
            2, 0, 1).to(self.device)
        out = {}
        if self.meta.heads.has_seg:
            k = len(self.meta.seg_classes)
            out["probs"] = self.tiler(frame, lambda t: self.model(t)["seg"].float().softmax(1), k,
                                      transform=self.normalise, autocast_dtype=self.autocast)
            out["score"] = float(1 - out["probs"][0].min())
        if self.meta.heads.has_cls:
            s = self.meta.img_size
            small = torch.from_numpy(np.array(Image.fromarray(image).resize((s, s), Image.BILINEAR)))
            small = (small[..., None] if small.ndim == 2 else small).permute(2, 0, 1)[None].float().to(self.device)
            out["cls_probs"] = self.model(self.normalise(small))["cls"].float().softmax(1)[0]
            if "probs" not in out:
                out["score"] = float(1 - out["cls_probs"][0]) if self._has_good() else float(out["cls_probs"].max())
        return out

    def _has_good(self) -> bool:
        names = self.meta.cls_classes
        return bool(names) and names[0].lower() in GOOD_NAMES


def defective(data: RealData, item: Item, mask: np.ndarray | None) -> int:
    if item.label is not None and data.cls_classes and data.cls_classes[0].lower() in GOOD_NAMES:
        return int(item.label != data.cls_classes[0])
    return int(mask is not None and bool(mask.any()))


def evaluate(predictor: Predictor, data: RealData, items: list[Item], in_chans: int, progress=None) -> dict:
    meta, dev = predictor.meta, torch.device("cpu")
    seg_k, cls_k = len(meta.seg_classes), len(meta.cls_classes)
    local = dict(sync_on_compute=False)  # evaluation runs on one process, even inside a distributed job
    pix = dict(iou=MulticlassJaccardIndex(seg_k, average="none", **local),
               dice=MulticlassF1Score(seg_k, average="none", **local),
               ap=BinaryAveragePrecision(thresholds=200, **local)) if seg_k else {}
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
        out = predictor(image)
        seconds.append(time.perf_counter() - t)
        if mask is not None and "probs" in out:
            target = torch.from_numpy(mask.astype(np.int64))
            pred = out["probs"].argmax(0).to(dev)
            pix["iou"].update(pred[None], target[None])
            pix["dice"].update(pred[None], target[None])
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
    if pix and pix["iou"].update_count:
        iou, dice = pix["iou"].compute(), pix["dice"].compute()
        result["pixel"] = {"iou": dict(zip(meta.seg_classes, iou.tolist())),
                           "miou": float(iou.mean()), "dice": dict(zip(meta.seg_classes, dice.tolist())),
                           "mdice": float(dice.mean()), "defect_ap": float(pix["ap"].compute())}
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

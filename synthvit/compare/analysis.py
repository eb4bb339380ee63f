"""The looking-at part of the report: test crops, each model's predictions and saliency on them, and CKA
between layers, computed from finished finetune runs (one per model, at the largest budget)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from synthvit.compare.cka import MinibatchCKA
from synthvit.compare.saliency import mass_share, pixel_auroc, saliency
from synthvit.data import Item, to_array
from synthvit.models import ExportMeta, SynthvitModel, meta_stats


@dataclass
class Crop:
    image: np.ndarray  # (S, S) or (S, S, 3) uint8
    mask: np.ndarray | None  # (S, S) class ids
    source: str


@dataclass
class Loaded:
    """A finished model: its report name, export meta, the model (eval mode, CPU) and whether it is a ViT."""
    name: str
    meta: ExportMeta
    model: SynthvitModel
    init: str

    @property
    def vit(self) -> bool:
        return self.model.is_vit

    def batch(self, crops: list[Crop]) -> torch.Tensor:
        """Normalised (N, C, S, S) float batch of the crops, with this model's mean and std."""
        x = torch.from_numpy(np.stack([c.image if c.image.ndim == 3 else c.image[..., None] for c in crops]))
        mean, std = meta_stats(self.meta)
        return (x.permute(0, 3, 1, 2).float() - mean) / std


def pick_crops(items: list[Item], in_chans: int, size: int, count: int, seed: int,
               defect_share: float = 0.75, max_rounds: int = 64) -> list[Crop]:
    """``count`` square crops from the test images, seeded: the first ``defect_share`` centred on a random defect
    pixel of defective images (as available), the rest anywhere in defect-free images. Each round visits every
    image once, so few test images still give many (different) crops."""
    rng = np.random.default_rng((seed, 7))
    order = rng.permutation(len(items))
    crops: list[Crop] = []
    for want_defect, target in ((True, int(round(count * defect_share))), (False, count)):
        for _ in range(max_rounds):
            before = len(crops)
            for k in order:
                if len(crops) >= target:
                    break
                crop = _crop(items[k], in_chans, size, rng, want_defect)
                if crop is not None:
                    crops.append(crop)
            if len(crops) >= target or len(crops) == before:
                break
    return crops[:count]


def _crop(item: Item, in_chans: int, size: int, rng, defect: bool) -> Crop | None:
    with item.load() as im:
        image = to_array(im, in_chans)
    h, w = image.shape[:2]
    if h < size or w < size:
        return None
    mask = item.mask((w, h)) if item.mask is not None else None
    ys, xs = np.nonzero(mask) if mask is not None else ((), ())
    if defect != bool(len(ys)):
        return None
    if defect:
        j = rng.integers(len(ys))
        cy, cx = int(ys[j]), int(xs[j])
    else:
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0 = int(np.clip(cy - size // 2, 0, h - size))
    x0 = int(np.clip(cx - size // 2, 0, w - size))
    window = (slice(y0, y0 + size), slice(x0, x0 + size))
    return Crop(image[window].copy(), mask[window].copy() if mask is not None else None,
                f"{item.id} @ ({x0}, {y0})")


@torch.no_grad()
def predict_crops(model: Loaded, crops: list[Crop]) -> list[np.ndarray | tuple[str, float]]:
    """Per crop: the predicted class map (segmentation) or (class name, probability) (classification)."""
    out = model.model(model.batch(crops))
    if "seg" in out:
        return list(out["seg"].argmax(1).numpy().astype(np.uint8))
    probs = out["cls"].float().softmax(1)
    names = model.meta.cls_classes
    return [(names[int(p.argmax())], float(p.max())) for p in probs]


def saliency_maps(model: Loaded, crops: list[Crop]) -> tuple[str, np.ndarray]:
    kind, maps = saliency(model.model, model.batch(crops))
    return kind, maps.numpy()


@dataclass
class Agreement:
    """How a model's saliency maps agree with the defect masks of the crops that hold defects (means over them)."""
    auroc: float | None  # pixel AUROC of the map against the mask
    mass: float | None  # share of the map's mass inside the mask
    crops: int


def saliency_agreement(maps: np.ndarray, crops: list[Crop]) -> Agreement:
    """:class:`Agreement` of (N, H, W) maps (one per crop) over the crops whose mask holds defect pixels."""
    pairs = [(m, c.mask) for m, c in zip(maps, crops) if c.mask is not None and c.mask.any()]

    def mean(values: list[float]) -> float | None:
        values = [v for v in values if not np.isnan(v)]
        return float(np.mean(values)) if values else None

    return Agreement(mean([pixel_auroc(m, k) for m, k in pairs]), mean([mass_share(m, k) for m, k in pairs]),
                     len(pairs))


def cka_pairs(models: list[Loaded]) -> list[tuple[Loaded, Loaded, str]]:
    """Raghu et al.'s views: each ViT and each CNN with itself, the first ViT against the first CNN, and a
    synthetic-pretrained ViT against a scratch ViT of the same architecture."""
    vits = [m for m in models if m.vit]
    cnns = [m for m in models if not m.vit]
    pairs = [(m, m, "ViT vs ViT") for m in vits] + [(m, m, "CNN vs CNN") for m in cnns]
    if vits and cnns:
        pairs.append((vits[0], cnns[0], "ViT vs CNN"))
    for synth in (m for m in vits if m.init):
        scratch = next((m for m in vits if not m.init and m.meta.model == synth.meta.model), None)
        if scratch is not None:
            pairs.append((synth, scratch, "synthetic-pretrained vs scratch ViT"))
    return pairs


def cka_matrices(models: list[Loaded], crops: list[Crop], batch: int) -> list[dict]:
    """Minibatch CKA heatmaps for :func:`cka_pairs`; a trailing partial minibatch is dropped."""
    pairs = cka_pairs(models)
    needed = {id(m): m for a, b, _ in pairs for m in (a, b)}
    names: dict[int, list[str]] = {}
    acc = {}
    for i in range(0, len(crops) - batch + 1, batch):
        feats = {}
        for key, m in needed.items():
            names[key], feats[key] = m.model.feature_blocks(m.batch(crops[i:i + batch]))
        for a, b, title in pairs:
            k = (id(a), id(b))
            acc.setdefault(k, MinibatchCKA(len(feats[id(a)]), len(feats[id(b)])))
            acc[k].update(feats[id(a)], feats[id(b)])
    return [{"title": title, "a": a.name, "b": b.name, "layers_a": names[id(a)], "layers_b": names[id(b)],
             "cka": acc[(id(a), id(b))].compute().numpy()} for a, b, title in pairs if (id(a), id(b)) in acc]

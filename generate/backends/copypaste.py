"""The user's own defects as a generator source (``backend=copypaste``, ``copypaste.data=FOLDER``).

FOLDER is a real-data folder in any finetune format with masks. Only its *train* split is read (``splits.csv``,
else the seeded split of ``copypaste.test_fraction`` / ``copypaste.data_seed``, finetune's defaults), so an image
finetune tests on is never drawn. The train images and masks are checked first as finetune checks them
(:func:`synthvit.data.checked_split`: every unreadable file, mask of another size or mask value outside the classes
in one error, before any shard); a test image is not opened (but for its mask and size where the seeded split is
stratified by defect presence, as finetune's is). Once per process (cached), :func:`load_source` cuts every
labelled defect of the train split out: one instance is a connected component (8-connected) of one class with
``copypaste.margin`` px of its surroundings (components under ``copypaste.min_area`` px are dropped and counted).
Only these patches are kept.

Sample ``index`` is drawn from ``numpy.random.default_rng((seed, index))`` alone (as every backend): a random
``image_size`` crop of a defect-free train frame (or, with ``copypaste.free_areas``, of a defective one, whose own
defects stay labelled), then 1..``copypaste.max_instances`` instances, each

- turned by k*90 degrees and flipped (exact), scaled (log-uniform in ``copypaste.scale``) and warped by a smooth
  random displacement of at most ``copypaste.elastic`` px, in one resampling: bilinear for the pixels, nearest for
  the mask;
- placed where its visible footprint covers no defect pixel (tried a few times, else skipped and counted);
- matched to its spot: an affine map per channel takes the mean/std of the patch's margin ring to those of the
  destination under it, and applies to the defect's pixels too (they keep their contrast to their own surroundings);
- blended: alpha is 1 on the instance and fades to 0 over ``copypaste.feather`` px at ``copypaste.margin`` (scaled)
  px from it (and away from other defects cut out with it), so no seam shows; the mask gets the exact transformed
  instance with its real class id.

Class ids and names are the real data's (``good`` for 0, the shard contract's name of the defect-free class). Each
sample's json names its ``background`` ({id, box}) and its ``sources`` (``<image id>#<component>``), ``pasted``
holds each instance's transform; ``_info.json`` gets ``copypaste``: the folder, split counts, the instance count
and every real id that can be drawn (``backgrounds``, ``free_area_frames``, ``defect_sources``, ``real_ids``).
"""
from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage, sparse
from scipy.sparse import linalg as splinalg

from generate.backends import BaseBackend
from generate.backgrounds import CACHE_BYTES, BackgroundPool, Source, allowed_train, read_real_ids
from generate.defects import Box, Instance, instance_records
from generate.schema import BACKGROUND, Sample, main_class_of
from synthvit.data import (
    GOOD_NAMES,
    SPLITS_FILE,
    DataError,
    checked_split,
    has_defect,
    load_real_data,
    shown_size,
    to_array,
    why,
)
from synthvit.io import SynthvitError

log = logging.getLogger("synthvit.generate")

KEY = "copypaste.data"
EIGHT = np.ones((3, 3), bool)  # 8-connected components
GRID = 4  # control points per side of the elastic displacement field
TRIES = 12  # placements tried per instance before it is skipped
GREY_SRC = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


class CopyPasteError(SynthvitError):
    pass


class Patch(NamedTuple):
    """One cut-out defect instance: its component's box plus the margin, at the source's resolution. ``data`` holds
    the pixels (C channels, 1 or 3), then ``keep`` (1, but 0 on the pixels of other defects the margin holds, which
    would show without a label, fading to 1 away from them), then the distance to the component (px)."""
    id: str  # "<image id>#<component index>"
    image: str  # the source image id
    cls: int  # its real class id (1..K)
    data: np.ndarray  # (h, w, C + 2) float32
    own: np.ndarray  # (h, w) bool: the component's pixels
    centre: tuple[float, float]  # where it sits in its frame: (row, column) of its centroid as shares of the frame
    angle: float  # its principal axis, degrees in [0, 180) (0: along x; image axes, y down)


def principal_angle(own: np.ndarray) -> float:
    """The angle (degrees in [0, 180), y down) of the principal axis of the pixels of ``own`` (0 for a single one)."""
    ys, xs = np.nonzero(own)
    if len(ys) < 2:
        return 0.0
    dy, dx = ys - ys.mean(), xs - xs.mean()
    return math.degrees(0.5 * math.atan2(2.0 * float((dx * dy).mean()), float((dx * dx).mean() - (dy * dy).mean()))) % 180.0


@dataclass
class RealSource:
    """What :func:`load_source` reads off a real-data folder once per process."""
    class_names: list[str]
    patches: list[Patch]
    frames: list[Source]  # the frames pasted into: defect-free train frames, then defective ones (free areas)
    masks: list[Callable[[tuple[int, int]], np.ndarray] | None]  # per frame: its mask (None: defect-free)
    record: dict  # for _info.json


def _displayed(load: Callable[[], Image.Image]) -> Callable[[], Image.Image]:
    """A loader of the image as displayed (EXIF orientation applied), the orientation its mask is in."""
    def shown() -> Image.Image:
        with load() as im:
            return ImageOps.exif_transpose(im)
    return shown


def _pixels(im: Image.Image) -> np.ndarray:
    """(H, W, 1) for a grey image (also an RGB one with equal channels), else (H, W, 3); uint8."""
    arr = to_array(im, 1 if im.mode in GREY_SRC else 3)
    if arr.ndim == 2:
        return arr[..., None]
    return arr[..., :1] if (arr == arr[..., :1]).all() else arr


def _components(sub: np.ndarray, classes: list[int]):
    """(class, box, pixels in the box) of each connected component of each class of ``sub`` (one region)."""
    if len(classes) == 1:
        yield classes[0], (slice(0, sub.shape[0]), slice(0, sub.shape[1])), sub > 0
        return
    for c in classes:
        lab, _ = ndimage.label(sub == c, structure=EIGHT)
        for j, box in enumerate(ndimage.find_objects(lab), start=1):
            yield c, box, lab[box] == j


def _cut(image_id: str, arr: np.ndarray, mask: np.ndarray, num_classes: int, margin: int, min_area: int,
         feather: float) -> tuple[list[Patch], int]:
    """The components of every class of ``mask`` as patches with ``margin`` px around them, and how many were under
    ``min_area`` px."""
    patches, dropped, n = [], 0, 0
    defect = mask > 0
    H, W = mask.shape
    regions, _ = ndimage.label(defect, structure=EIGHT)  # a component of one class lies in one region
    for r, (ry, rx) in enumerate(ndimage.find_objects(regions), start=1):
        sub = np.where(regions[ry, rx] == r, mask[ry, rx], 0)
        classes = np.unique(sub[sub > 0]).tolist()
        if classes[-1] >= num_classes:
            raise ValueError(f"mask value {classes[-1]} outside the classes 0..{num_classes - 1}")
        for c, (sy, sx), comp in _components(sub, classes):
            n += 1
            if int(comp.sum()) < min_area:
                dropped += 1
                continue
            top, left = ry.start + sy.start, rx.start + sx.start  # the component's box in the image
            y0, y1 = max(0, top - margin), min(H, top + comp.shape[0] + margin)
            x0, x1 = max(0, left - margin), min(W, left + comp.shape[1] + margin)
            own = np.zeros((y1 - y0, x1 - x0), bool)
            own[top - y0:top - y0 + comp.shape[0], left - x0:left - x0 + comp.shape[1]] = comp
            other = defect[y0:y1, x0:x1] & ~own
            C = arr.shape[2]
            data = np.empty((*own.shape, C + 2), np.float32)
            data[..., :C] = arr[y0:y1, x0:x1]
            data[..., C] = np.clip((ndimage.distance_transform_edt(~other) - 1.0) / max(feather, 1.0), 0.0,
                                   1.0) if other.any() else 1.0
            data[..., C + 1] = np.minimum(ndimage.distance_transform_edt(~own), 1000.0)
            ys, xs = np.nonzero(comp)
            centre = ((top + ys.mean() + 0.5) / H, (left + xs.mean() + 0.5) / W)
            patches.append(Patch(f"{image_id}#{n - 1}", image_id, int(c), data, own, centre, principal_angle(comp)))
    return patches, dropped


def _fail(root: Path, what: str) -> CopyPasteError:
    return CopyPasteError(f"{KEY}: {root} {what}")


@lru_cache(maxsize=4)
def load_source(folder: str, fmt: str = "auto", test_fraction: float = 0.3, data_seed: int = 0,
                split_missing: str = "error", margin: int = 4, min_area: int = 4, feather: float = 3.0,
                free_areas: bool = True, allowed: frozenset[str] | None = None) -> RealSource:
    """The defect patches and the frames of ``folder``'s train split (cached per process); every problem of the
    input is one :class:`CopyPasteError`, raised before any shard."""
    root = Path(folder)
    if not root.is_dir():
        raise _fail(root, "is not a folder; give a real-data folder (any finetune format) with labelled defects")
    try:
        data = load_real_data(root, fmt, check=False, split_missing=split_missing)
        if not data.has_masks:
            raise _fail(root, f"({data.fmt} layout) has no masks"
                        f"{': ' + data.masks_refused if data.masks_refused else ''}; copy-paste cuts out labelled "
                        f"defects: give masks, polygons or COCO segmentations")
        # every train image, or those real_ids lists (a budget's own, in compare), checked as finetune checks them
        split, train = checked_split(data, test_fraction, data_seed,
                                     lambda split: allowed_train(root, data, split, allowed, KEY))
    except DataError as e:
        raise CopyPasteError(f"{KEY}: {e}") from None
    except CopyPasteError:
        raise
    except SynthvitError as e:
        raise CopyPasteError(str(e)) from None
    train = sorted(train, key=lambda i: i.id)
    source = (f"{SPLITS_FILE}" if data.splits else f"seeded: copypaste.test_fraction={test_fraction}, "
              f"copypaste.data_seed={data_seed}")
    test = [i for i in data.items if split[i.id] == "test"]
    if not train:
        raise _fail(root, f"({data.fmt} layout) has no train image: all {len(test)} images are in the test split "
                    f"({source}); copy-paste draws from the train split only")
    defective = [i for i in train if has_defect(i)]
    # defect-free: an empty mask and, with image labels, a defect-free label (an empty mask under a defect label is
    # an unlabelled defect: never pasted into)
    free = [i for i in train if not has_defect(i) and not (data.has_labels and (i.label or "").lower() not in
                                                           GOOD_NAMES)]
    if not defective:
        raise _fail(root, f"({data.fmt} layout) has no labelled defect in its train split (train: {len(train)} "
                    f"images, 0 with a defect; test: {len(test)} images, {sum(has_defect(i) for i in test)} with a "
                    f"defect; split: {source}); copy-paste needs defects with masks in the train split")
    patches, dropped, problems, frames, masks = [], 0, [], [], []
    defective_ids = {i.id for i in defective}
    for item in free + defective:  # defective frames: their defects cut out; with free_areas, frames too
        load = _displayed(item.load)
        cut_here = item.id in defective_ids
        try:
            with item.load() as im:
                size = shown_size(im)
            if cut_here:
                with load() as im:
                    arr = _pixels(im)
                mask = item.mask(size)
                if mask.shape != arr.shape[:2]:
                    raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {size[0]}x{size[1]}")
                cut, small = _cut(item.id, arr, mask, len(data.seg_classes), margin, min_area, feather)
                patches += cut
                dropped += small
        except Exception as e:  # PIL raises OSError, SyntaxError, DecompressionBombError ...
            problems.append(f"{item.source}: {why(e)}")
            continue
        if not cut_here or free_areas:
            frames.append(Source(item.id, item.source, load, size))
            masks.append(item.mask if cut_here else None)
    if problems:
        raise CopyPasteError(f"{KEY}: {len(problems)} problem(s) in {root}: " + "; ".join(problems[:20])
                             + (" ..." if len(problems) > 20 else "") + "; remove or fix them")
    if not patches:
        raise _fail(root, f"has no defect of at least copypaste.min_area={min_area} px in its train split "
                    f"({dropped} smaller components); lower copypaste.min_area")
    if not frames:
        raise _fail(root, f"has no defect-free image in its train split ({len(defective)} defective) to paste into; "
                    f"set copypaste.free_areas=true to paste into the defect-free areas of defective frames")
    names = list(data.seg_classes)
    per_class = {names[c]: n for c, n in sorted(
        {c: sum(p.cls == c for p in patches) for c in {p.cls for p in patches}}.items())}
    backgrounds = [i.id for i in free]
    free_area = [i.id for i in defective] if free_areas else []
    sources = sorted({p.image for p in patches})
    record = {"folder": str(root), "format": data.fmt, "classes": names,
              "split": {"source": source, "train": len(train), "test": len(test),
                        "train_defective": len(defective), "train_defect_free": len(free),
                        "train_unused": len(train) - len(defective) - len(free)},
              "instances": {"count": len(patches), "per_class": per_class, "dropped_small": dropped,
                            "min_area": min_area, "margin": margin},
              "backgrounds": backgrounds, "free_area_frames": free_area, "defect_sources": sources,
              "real_ids": sorted(set(backgrounds) | set(free_area) | set(sources))}
    return RealSource([BACKGROUND, *names[1:]], patches, frames, masks, record)


class FramePool(BackgroundPool):
    """:class:`~generate.backgrounds.BackgroundPool` crops (smaller frames scaled up to cover the frame), with the
    crop of each defective frame's own mask (nearest, as the frame is scaled), cached per process as the frames are."""

    def __init__(self, sources: list[Source], masks: list, width: int, height: int, warn: bool = False):
        super().__init__(sources, width, height, "crop", warn, KEY)
        self.masks = masks
        self._mask_cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._mask_bytes = 0

    def _mask(self, k: int, shape: tuple[int, int]) -> np.ndarray:
        if k in self._mask_cache:
            self._mask_cache.move_to_end(k)
            return self._mask_cache[k]
        m = self.masks[k](self.sources[k].size)
        if m.shape != shape:
            m = np.asarray(Image.fromarray(m).resize((shape[1], shape[0]), Image.Resampling.NEAREST))
        self._mask_cache[k] = m
        self._mask_bytes += m.nbytes
        while self._mask_bytes > CACHE_BYTES // 4 and len(self._mask_cache) > 1:
            self._mask_bytes -= self._mask_cache.popitem(last=False)[1].nbytes
        return m

    def frame(self, rng) -> tuple[np.ndarray, np.ndarray | None, dict, tuple[int, int, int, int]]:
        """A crop (H, W) or (H, W, 3) uint8, its mask (None: a defect-free frame), its record ``{id, box}`` and
        where it lies in its (scaled) frame: (frame height, frame width, crop top, crop left)."""
        k, arr, scale, x0, y0 = self.draw(rng)
        H, W = self.height, self.width
        mask = None if self.masks[k] is None else self._mask(k, arr.shape[:2])[y0:y0 + H, x0:x0 + W]
        return arr[y0:y0 + H, x0:x0 + W], mask, self.crop_record(k, scale, x0, y0), (*arr.shape[:2], y0, x0)


class Transformed(NamedTuple):
    pixels: np.ndarray  # (h, w, C) float32
    own: np.ndarray  # (h, w) bool: the instance's pixels, exact (nearest)
    alpha: np.ndarray  # (h, w) float32: 1 on the instance, fading to 0 over the margin
    ring: np.ndarray  # (h, w) bool: the margin pixels the brightness match reads
    params: dict
    centre: tuple[float, float] = (0.5, 0.5)  # the instance's centroid as shares of the patch box (row, column)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


@lru_cache(maxsize=1024)
def _spline(n: int) -> np.ndarray:
    """(n, GRID) weights that interpolate GRID control points smoothly (smoothstep between neighbours) over n px."""
    u = np.linspace(0.0, GRID - 1, n)
    i0 = np.minimum(u.astype(np.intp), GRID - 2)
    t = _smoothstep(u - i0)
    w = np.zeros((n, GRID), np.float32)
    w[np.arange(n), i0], w[np.arange(n), i0 + 1] = 1.0 - t, t
    return w


def _resample(own: np.ndarray, src: np.ndarray, Y: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``own`` (nearest; outside the patch: False) and ``src`` (h, w, K) (bilinear, float32, edges extended) read at
    the source positions ``Y``, ``X`` (each (ho, wo), in px of the patch)."""
    h, w = own.shape
    yn = np.floor(Y + 0.5).astype(np.intp)
    xn = np.floor(X + 0.5).astype(np.intp)
    inside = (yn >= 0) & (yn < h) & (xn >= 0) & (xn < w)
    own_t = own.ravel()[np.clip(yn, 0, h - 1) * w + np.clip(xn, 0, w - 1)] & inside
    yc, xc = np.clip(Y, 0, h - 1), np.clip(X, 0, w - 1)
    y0, x0 = np.minimum(yc.astype(np.intp), max(h - 2, 0)), np.minimum(xc.astype(np.intp), max(w - 2, 0))
    ty, tx = (yc - y0)[..., None], (xc - x0)[..., None]
    flat = src.reshape(-1, src.shape[2])  # one gather per corner, all channels at once
    i00, dx, dy = y0 * w + x0, int(w > 1), w if h > 1 else 0
    top, right = np.take(flat, i00, axis=0), np.take(flat, i00 + dx, axis=0)
    top += (right - top) * tx
    bottom, right = np.take(flat, i00 + dy, axis=0), np.take(flat, i00 + dy + dx, axis=0)
    bottom += (right - bottom) * tx
    top += (bottom - top) * ty
    return own_t, top


class CopyPasteBackend(BaseBackend):
    """Defects cut out of a real-data folder's train split, pasted into its defect-free train frames."""

    name = "copypaste"

    def __init__(self, cfg):
        self.cfg = cfg
        self.p = p = cfg.copypaste
        self.width, self.height = cfg.size
        self.source = self._load()
        self.class_names = self.source.class_names
        self.patches = self.source.patches
        self.pool = FramePool(self.source.frames, self.source.masks, self.width, self.height)
        self.log_scale = (math.log(p.scale[0]), math.log(p.scale[-1]))
        by_class: dict[int, list[Patch]] = {}
        for patch in self.patches:
            by_class.setdefault(patch.cls, []).append(patch)
        # where and how the real train defects of each class lie: orientation=real, placement=real draw from these
        self.angles = {c: np.array([q.angle for q in ps]) for c, ps in by_class.items()}
        self.sites = {c: np.array([q.centre for q in ps]) for c, ps in by_class.items()}

    def _load(self) -> RealSource:
        p = self.p
        return load_source(p.data, p.format, p.test_fraction, p.data_seed, p.split_missing, p.margin, p.min_area,
                           float(p.feather), p.free_areas, read_real_ids(self.cfg.real_ids))

    def validate(self) -> None:
        """Warns about frames smaller than the image size; run once before any shard. Every image and mask it reads
        (the train split's) was checked as finetune checks them when the source was loaded (one error listing every
        problem); the test split's images are never opened."""
        FramePool(self.source.frames, self.source.masks, self.width, self.height, warn=True)
        r = self.source.record
        log.info("copypaste: %d defect instances (%s; %d under %d px dropped) from %d train images of %s; pasted "
                 "into %d defect-free frames%s", r["instances"]["count"],
                 ", ".join(f"{k} {v}" for k, v in r["instances"]["per_class"].items()), r["instances"]["dropped_small"],
                 r["instances"]["min_area"], len(r["defect_sources"]), r["folder"], len(r["backgrounds"]),
                 f" and the free areas of {len(r['free_area_frames'])} defective ones" if r["free_area_frames"] else "")

    @property
    def info(self) -> dict:
        """``copypaste``: the folder, split, instances and every real id that can be drawn."""
        return {"copypaste": self.source.record}

    # ------------------------------------------------------------------------------------------- one sample
    def render(self, index: int) -> Sample:
        rng = np.random.default_rng((self.cfg.seed, index))
        p = self.p
        crop, existing, record, where = self.pool.frame(rng)
        H, W = crop.shape[:2]
        C = 1 if crop.ndim == 2 else 3
        img = crop.reshape(H, W, C).copy()
        inst = np.zeros((H, W), np.int32)
        instances: list[Instance] = []
        if existing is not None and existing.any():
            mask = existing.copy()
            self._label_existing(mask, inst, instances)
        else:
            mask = np.zeros((H, W), np.uint8)
        occupied = mask > 0
        drawn = 0 if p.defect_free_prob and rng.random() < p.defect_free_prob else int(
            rng.integers(1, p.max_instances + 1))
        pasted, skipped = [], 0
        for _ in range(drawn):
            patch = self.patches[int(rng.integers(len(self.patches)))]
            t = self._transform(rng, patch, C)
            h, w = t.own.shape
            if not t.own.any():  # a speck may vanish shrunk
                at = None
            elif p.placement == "real":
                at = self._place_real(rng, t, occupied, self.sites[patch.cls], where)
            else:
                at = self._place(rng, t.alpha > 0, occupied, img if p.placement == "context" else None, t)
            if at is None:
                skipped += 1
                continue
            y, x = at[:2]
            if p.placement == "real":
                t.params["placed"] = at[2]
            self._blend(img[y:y + h, x:x + w], t, occupied[y:y + h, x:x + w], p.match, p.blend)
            mask[y:y + h, x:x + w][t.own] = patch.cls
            inst[y:y + h, x:x + w][t.own] = len(instances) + 1
            occupied[y:y + h, x:x + w] |= t.own
            instances.append(Instance(patch.cls, Box(y, y + h, x, x + w)))
            pasted.append(dict(source=patch.id, image=patch.image, **{"class": patch.cls},
                               name=self.class_names[patch.cls], at=[x, y], area=int(t.own.sum()), **t.params))
        defects = instance_records(inst, instances, self.class_names)
        meta = dict(backend=self.name, seed=self.cfg.seed, index=index, size=[W, H], channels=C, background=record,
                    sources=[d["source"] for d in pasted], pasted=pasted, instances_drawn=drawn,
                    instances_skipped=skipped, existing_pixels=int((existing > 0).sum()) if existing is not None else 0,
                    defects=defects)
        return Sample(img[..., 0] if C == 1 else img, mask, main_class_of(defects, len(self.class_names)), meta)

    @staticmethod
    def _label_existing(mask: np.ndarray, inst: np.ndarray, instances: list[Instance]) -> None:
        """The defects a defective frame's crop holds, as instances (their own class ids) in ``inst``."""
        for c in np.unique(mask[mask > 0]).tolist():
            lab, _ = ndimage.label(mask == c, structure=EIGHT)
            for j, (sy, sx) in enumerate(ndimage.find_objects(lab), start=1):
                inst[sy, sx][lab[sy, sx] == j] = len(instances) + 1
                instances.append(Instance(int(c), Box(sy.start, sy.stop, sx.start, sx.stop)))

    def _transform(self, rng, patch: Patch, C: int) -> Transformed:
        """``patch`` turned, flipped, scaled and warped (drawn from ``rng``), in ``C`` channels, with its alpha."""
        p = self.p
        if p.rotate and p.orientation != "right":
            return self._turned(rng, patch, C)
        k = int(rng.integers(4)) if p.rotate else 0
        flip = bool(rng.random() < 0.5) if p.rotate else False
        s, field = self._scale_and_field(rng)
        src, own = patch.data, patch.own
        if flip:
            src, own = src[:, ::-1], own[:, ::-1]
        if k:
            src, own = np.rot90(src, k), np.rot90(own, k)
        h, w = own.shape
        s = min(s, self.width / w, self.height / h)  # the patch fits the frame
        ho, wo = max(1, round(h * s)), max(1, round(w * s))
        if (ho, wo) == (h, w) and field is None:  # an exact copy
            values = src.copy()
        else:
            Y = np.broadcast_to((np.arange(ho, dtype=np.float32) + 0.5) * np.float32(h / ho) - 0.5, (wo, ho)).T
            X = np.broadcast_to((np.arange(wo, dtype=np.float32) + 0.5) * np.float32(w / wo) - 0.5, (ho, wo))
            Y, X = self._warp(Y, X, field, s)
            own, values = _resample(own, src, Y, X)
            values[..., -1] *= np.float32(s)  # the distance, in px of the output
        by, bx = np.minimum(np.arange(ho), np.arange(ho)[::-1]), np.minimum(np.arange(wo), np.arange(wo)[::-1])
        border = np.minimum(by[:, None], bx[None, :])  # px to the patch's border
        params = dict(rotation=90 * k, flip=flip, scale=round(s, 4), size=[wo, ho], elastic=field is not None)
        return self._finish(values, own, s, border, C, params)

    def _scale_and_field(self, rng) -> tuple[float, np.ndarray | None]:
        """An instance's scale (log-uniform in ``copypaste.scale``) and elastic control points (None: no warp)."""
        lo, hi = self.log_scale
        s = math.exp(rng.uniform(lo, hi)) if hi > lo else math.exp(lo)
        return s, rng.standard_normal((2, GRID, GRID)) if self.p.elastic > 0 else None

    def _warp(self, Y: np.ndarray, X: np.ndarray, field: np.ndarray | None, s: float) -> tuple[np.ndarray, np.ndarray]:
        """The source positions ``Y``, ``X`` (ho, wo) moved by a smooth field through GRID x GRID random control
        points, at most ``copypaste.elastic`` output px (``field`` None: as they are)."""
        if field is None:
            return Y, X
        wy, wx = _spline(Y.shape[0]), _spline(Y.shape[1])
        amp = np.float32(self.p.elastic / 2.0 / s)  # output px -> source px
        return (Y + (wy @ np.clip(field[0], -2, 2).astype(np.float32) @ wx.T) * amp,
                X + (wy @ np.clip(field[1], -2, 2).astype(np.float32) @ wx.T) * amp)

    def _finish(self, values: np.ndarray, own: np.ndarray, s: float, border: np.ndarray, C: int,
                params: dict) -> Transformed:
        """The transformed pixels in ``C`` channels and the alpha of an instance: ``values`` (pixels, keep, distance
        to the instance in output px), ``border``: px to the cut-out's border (outside it: <= 0)."""
        p = self.p
        pixf, keepf, dist = values[..., :-2], values[..., -2], values[..., -1]
        if pixf.shape[2] != C:  # a grey defect on a colour frame, or a colour one on a grey frame
            pixf = np.repeat(pixf, 3, axis=2) if C == 3 else (pixf @ LUMA)[..., None]
        # alpha: 1 on the instance, fading to 0 over `feather` px at `margin` px from it (both scaled with it)
        reach = max(1.0, p.margin * s)
        if p.feather > 0:
            fade = _smoothstep(np.clip((reach - dist) / min(p.feather * s, reach), 0.0, 1.0))
        else:
            fade = (dist <= reach).astype(np.float32)
        fade *= np.clip(border / max(p.feather, 1.0), 0.0, 1.0)  # 0 at the border
        fade *= keepf
        ring = ~own & (keepf > 0.5) & (border >= 0)  # (a turned cut-out: only pixels read inside it)
        alpha = np.where(own, np.float32(1.0), fade.astype(np.float32))
        ys, xs = np.nonzero(own)
        centre = ((ys.mean() + 0.5) / own.shape[0], (xs.mean() + 0.5) / own.shape[1]) if len(ys) else (0.5, 0.5)
        return Transformed(pixf, own, alpha, ring, params, centre)

    def _turned(self, rng, patch: Patch, C: int) -> Transformed:
        """``patch`` flipped at random, turned by any angle (``orientation=any``) or so that its axis lies at the
        angle of a real train defect of its class (``real``), scaled and warped, in one resampling."""
        p = self.p
        flip = bool(rng.random() < 0.5)
        own_angle = (-patch.angle if flip else patch.angle) % 180.0
        if p.orientation == "any":
            theta = float(rng.uniform(0.0, 360.0))
        else:  # its axis at a real defect's, either way along it
            angles = self.angles[patch.cls]
            theta = float(angles[int(rng.integers(len(angles)))]) - own_angle + 180.0 * int(rng.integers(2))
        s, field = self._scale_and_field(rng)
        src, own = patch.data, patch.own
        if flip:
            src, own = src[:, ::-1], own[:, ::-1]
        h, w = own.shape
        c, si = math.cos(math.radians(theta)), math.sin(math.radians(theta))
        hr, wr = abs(h * c) + abs(w * si), abs(h * si) + abs(w * c)  # the turned box
        s = min(s, self.width / wr, self.height / hr)
        ho, wo = max(1, math.ceil(hr * s - 1e-6)), max(1, math.ceil(wr * s - 1e-6))
        yo = (np.arange(ho, dtype=np.float32) + 0.5 - ho / 2)[:, None]
        xo = (np.arange(wo, dtype=np.float32) + 0.5 - wo / 2)[None, :]
        # output px -> source px: the inverse turn about the centres, then the inverse scale
        X = (c * xo + si * yo) / np.float32(s) + np.float32((w - 1) / 2)
        Y = (-si * xo + c * yo) / np.float32(s) + np.float32((h - 1) / 2)
        Y, X = self._warp(Y, X, field, s)
        Y, X = Y.astype(np.float32), X.astype(np.float32)
        own, values = _resample(own, src, Y, X)
        values[..., -1] *= np.float32(s)
        border = np.minimum(np.minimum(Y + 0.5, h - 0.5 - Y), np.minimum(X + 0.5, w - 0.5 - X)) * np.float32(s)
        params = dict(rotation=round(theta % 360.0, 2), flip=flip, scale=round(s, 4), size=[wo, ho],
                      elastic=field is not None)
        return self._finish(values, own, s, border, C, params)

    @staticmethod
    def _place(rng, footprint: np.ndarray, occupied: np.ndarray, img: np.ndarray | None = None,
               t: Transformed | None = None) -> tuple[int, int] | None:
        """A top-left corner where ``footprint`` covers no ``occupied`` pixel (None after TRIES draws). With ``img``
        (``copypaste.placement=context``): of the TRIES free corners drawn, the one whose pixels under the patch's
        margin ring look most like the ring it was cut with (per channel mean and std: a defect cut from a trace
        lands on a trace, one from a flat area on a flat area), as defects sit in the real frames."""
        h, w = footprint.shape
        H, W = occupied.shape
        best, best_cost = None, np.inf
        src = t.pixels[t.ring] if img is not None and t is not None and t.ring.sum() >= 4 else None
        for _ in range(TRIES):
            y, x = int(rng.integers(H - h + 1)), int(rng.integers(W - w + 1))
            if occupied[y:y + h, x:x + w][footprint].any():
                continue
            if src is None:
                return y, x
            dst = img[y:y + h, x:x + w][t.ring].astype(np.float32)
            cost = float(np.abs(dst.mean(0) - src.mean(0)).sum() + np.abs(dst.std(0) - src.std(0)).sum())
            if cost < best_cost:
                best, best_cost = (y, x), cost
        return best

    def _place_real(self, rng, t: Transformed, occupied: np.ndarray, sites: np.ndarray,
                    where: tuple[int, int, int, int]) -> tuple[int, int, str] | None:
        """``copypaste.placement=real``: the instance's centroid where a real train defect of its class sits in its
        frame (``sites``: centroids as shares of the frame), at the same shares of this frame (``where``: its
        height, width and the crop's top-left), moved by up to a quarter of the patch; of TRIES such spots the first
        inside the crop and free, else a uniform one. Returns (top, left, "real" or "uniform")."""
        fh, fw, y0, x0 = where
        h, w = t.own.shape
        H, W = occupied.shape
        footprint = t.alpha > 0
        for _ in range(TRIES):
            v, u = sites[int(rng.integers(len(sites)))]
            jy, jx = rng.uniform(-0.25, 0.25, 2)
            y = int(round(v * fh - y0 - t.centre[0] * h + jy * h))
            x = int(round(u * fw - x0 - t.centre[1] * w + jx * w))
            if 0 <= y <= H - h and 0 <= x <= W - w and not occupied[y:y + h, x:x + w][footprint].any():
                return y, x, "real"
        at = self._place(rng, footprint, occupied)
        return None if at is None else (*at, "uniform")

    @staticmethod
    def _blend(region: np.ndarray, t: Transformed, occupied: np.ndarray, match: bool = True,
               blend: str = "alpha") -> None:
        """Paste ``t`` into ``region`` (h, w, C) uint8 in place: with ``match``, its margin ring's mean/std per channel
        matched to the destination's under it (the defect follows by the same map); then alpha-blended, or with
        ``blend="poisson"`` cloned seamlessly (:func:`poisson_clone`) over its footprint."""
        dst = region.astype(np.float32)
        pix = t.pixels
        sel = t.ring & ~occupied
        if match and t.ring.sum() >= 4 and sel.sum() >= 4:
            src_ring, dst_ring = pix[t.ring], dst[sel]
            ms, ss = src_ring.mean(0), src_ring.std(0)
            md, sd = dst_ring.mean(0), dst_ring.std(0)
            gain = np.where(ss > 1.0, np.clip(sd / np.maximum(ss, 1e-6), 0.5, 2.0), 1.0).astype(np.float32)
            pix = (pix - ms) * gain + md
        if blend == "poisson":
            out = poisson_clone(dst, pix, t.alpha > 0)
        else:
            a = t.alpha[..., None]
            out = dst + a * (pix - dst)
        out += 0.5
        np.clip(out, 0.0, 255.0, out=out)
        region[...] = out


def poisson_clone(dst: np.ndarray, src: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Seamless cloning (Perez, Gangnet and Blake 2003): inside ``region`` (h, w) bool, less the box's outermost
    pixels, the values whose 4-neighbour Laplacian is that of ``src`` and which meet ``dst`` at the region's edge;
    ``dst`` elsewhere. ``dst`` and ``src`` (h, w, C) float32; one sparse LU factorisation serves every channel."""
    inner = region.copy()
    inner[[0, -1], :] = False
    inner[:, [0, -1]] = False
    out = dst.copy()
    ys, xs = np.nonzero(inner)
    n = len(ys)
    if n == 0:
        return out
    index = np.full(inner.shape, -1, np.intp)
    index[ys, xs] = np.arange(n)
    b = np.zeros((n, dst.shape[2]), np.float64)
    rows, cols = [], []
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny, nx = ys + dy, xs + dx
        j = index[ny, nx]
        inside = j >= 0
        rows.append(np.nonzero(inside)[0])
        cols.append(j[inside])
        b += src[ys, xs] - src[ny, nx]  # the guidance: the source's gradient
        b[~inside] += dst[ny[~inside], nx[~inside]]  # the boundary: the destination's values
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    A = sparse.csc_matrix((np.concatenate([np.full(n, 4.0), -np.ones(len(rows))]),
                           (np.concatenate([np.arange(n), rows]), np.concatenate([np.arange(n), cols]))),
                          shape=(n, n))
    out[ys, xs] = splinalg.splu(A).solve(b).astype(np.float32)
    return out

"""Property-based (hypothesis) tests of the real-data readers (finetune/datasets.py), one family per format.

The contract, whatever the folder holds: ``load_real_data(root)`` (which validates) either returns data whose every
item then loads the way a run loads it (``to_array`` of the image, ``item.mask`` at its displayed size,
``label_index``, ``split_ids``) without an exception, or raises the one :class:`DataError` that names every
corrupted file; never another exception type (ValueError, KeyError, TypeError, PIL or OS errors ...), and a valid
file is never named. Valid variants cover every pixel format the readers take (1-bit, 8/16-bit gray, float, palette,
RGB(A), CMYK), EXIF orientations (masks are drawn on the displayed, EXIF-transposed image, as labelme does), masks in
8-bit, 16-bit, 1-bit, palette (indices are classes) and gray RGB; their masks must also read back exactly.

A byte-level corruption that Pillow still decodes (a flipped byte in pixel data, a cut-off trailer) may load: the
reader must then agree with Pillow and load it. Examples per test: ``fuzz(n)`` (``CASES`` counts what ran per
format); ``SYNTHVIT_FUZZ_SCALE=10`` multiplies them, ``SYNTHVIT_FUZZ_RANDOM=1`` draws fresh examples (the default
replays the same derandomized ones, so CI is stable), ``SYNTHVIT_FUZZ_SHRINK=1`` shrinks a failing example (slow),
``SYNTHVIT_FUZZ_COUNTS=<file>`` writes the counts as JSON.
"""
from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import rle_counts, rle_string
from generate.schema import make_info
from synthvit.data import DataError, load_real_data, rle_decode, set_pixel_cap, shown_size, split_ids, to_array

# Pillow warns about the corrupt files it is fed here (bad EXIF, tags past the end, bomb-sized headers)
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]
SCALE = float(os.environ.get("SYNTHVIT_FUZZ_SCALE", "1"))
CASES: Counter = Counter()  # generated cases per format, and per outcome ("canonical", "canonical:reported", ...)


def fuzz(n: int):
    # No shrinking unless asked: shrinking a failing example of these many-draw cases takes minutes (Hypothesis
    # gives it up to 5); the failure is printed with every draw, and the *_MINIMAL tables hold minimal ones.
    phases = [p for p in Phase if p != Phase.shrink or os.environ.get("SYNTHVIT_FUZZ_SHRINK")]
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None, phases=phases,
                    derandomize=not os.environ.get("SYNTHVIT_FUZZ_RANDOM"),
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def _module():
    import datasets

    datasets.disable_progress_bars()
    yield
    if os.environ.get("SYNTHVIT_FUZZ_COUNTS"):
        Path(os.environ["SYNTHVIT_FUZZ_COUNTS"]).write_text(json.dumps(dict(sorted(CASES.items())), indent=1))


# ---------------------------------------------------------------------------------------------- images and masks
EXT_MODES = {".png": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"), ".jpg": ("L", "RGB", "CMYK"),
             ".tif": ("1", "L", "P", "RGB", "RGBA", "I;16", "I", "F"), ".bmp": ("1", "L", "RGB"),
             ".webp": ("RGB", "RGBA")}
SAVE_AS = {".png": "PNG", ".jpg": "JPEG", ".tif": "TIFF", ".bmp": "BMP", ".webp": "WEBP"}
EXIF_EXTS = (".png", ".jpg", ".tif", ".webp")
ORIENTATION = 0x0112


def pil_image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "1":
        return Image.fromarray(rng.random((h, w)) > 0.5)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-2**20, 2**20, (h, w), dtype=np.int32))
    if mode == "F":
        return Image.fromarray((rng.random((h, w)) * 1000).astype(np.float32))
    if mode == "P":
        im = Image.new("P", (w, h))
        im.putdata(rng.integers(0, 16, h * w).tolist())
        im.putpalette(rng.integers(0, 256, 48, dtype=np.uint8).tobytes())
        return im
    gray = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
    if mode == "L":
        return gray
    if mode == "LA":
        return Image.merge("LA", (gray, Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))))
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return rgb if mode == "RGB" else rgb.convert(mode)  # RGBA (opaque), CMYK


def encode(im: Image.Image, ext: str, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    kw = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        kw["exif"] = exif
    im.save(buf, SAVE_AS[ext.lower()], **kw)
    return buf.getvalue()


@dataclass
class Img:
    ext: str
    mode: str
    w: int
    h: int
    orientation: int | None
    data: bytes

    @property
    def shown(self) -> tuple[int, int]:
        """(width, height) as displayed: EXIF orientations 5-8 swap the sides."""
        return (self.h, self.w) if self.orientation in (5, 6, 7, 8) else (self.w, self.h)


@st.composite
def images(draw, exts=tuple(EXT_MODES), exif=True, max_side=12):
    ext = draw(st.sampled_from(exts))
    mode = draw(st.sampled_from(EXT_MODES[ext]))
    w, h = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    orientation = draw(st.sampled_from((None, 1, 2, 3, 5, 6, 7, 8))) if exif and ext in EXIF_EXTS else None
    data = encode(pil_image(mode, w, h, draw(st.integers(0, 255))), ext, orientation)
    return Img(ext.upper() if draw(st.integers(0, 5)) == 0 else ext, mode, w, h, orientation, data)


BINARY_MASK_MODES = ("L", "I;16", "1", "P", "RGB", "LA", "RGBA")
CLASS_MASK_MODES = ("L", "I;16", "P", "RGB", "LA", "RGBA")


def mask_image(values: np.ndarray, mode: str, binary: bool, seed: int = 0) -> Image.Image:
    """``values``: a (H, W) uint8 class map (0..k, or 0/255 when ``binary``), stored in ``mode``."""
    if mode == "1":
        return Image.fromarray(values > 0)
    if mode == "I;16":
        return Image.fromarray(values.astype(np.uint16) * (257 if binary else 1))  # 0/65535 binary
    if mode == "P":  # indices are the classes, whatever colours the palette shows
        im = Image.new("P", values.shape[::-1])
        im.putdata(values.ravel().tolist())
        im.putpalette(np.random.default_rng(seed).integers(0, 256, 768, dtype=np.uint8).tobytes())
        return im
    gray = Image.fromarray(values)
    if mode == "L":
        return gray
    opaque = Image.new("L", gray.size, 255)
    return {"LA": lambda: Image.merge("LA", (gray, opaque)), "RGB": lambda: Image.merge("RGB", (gray,) * 3),
            "RGBA": lambda: Image.merge("RGBA", (gray,) * 3 + (opaque,))}[mode]()


@st.composite
def class_maps(draw, shown: tuple[int, int], binary: bool, k: int, modes=None):
    """(mask PNG bytes, the class map it must read back as)."""
    w, h = shown
    mode = draw(st.sampled_from(modes or (BINARY_MASK_MODES if binary else CLASS_MASK_MODES)))
    seed = draw(st.integers(0, 255))
    rng = np.random.default_rng(seed)
    levels = np.array([0, 255] if binary else list(range(k + 1)), np.uint8)
    values = levels[rng.integers(0, len(levels), (h, w))] if draw(st.booleans()) else np.zeros((h, w), np.uint8)
    truth = (values > 0).astype(np.uint8) if binary else values
    return encode(mask_image(values, mode, binary, seed), ".png"), truth


def decodes(data: bytes) -> bool:
    """Whether Pillow reads ``data`` whole (a corruption it survives need not be reported)."""
    set_pixel_cap(8192 * 8192)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            to_array(im)
        return True
    except Exception:
        return False


def png_header(w: int, h: int) -> bytes:
    """A PNG that claims ``w`` x ``h`` (CRC right) and holds no pixel data."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


@st.composite
def broken_bytes(draw, data: bytes, how: str) -> bytes:
    """``data`` truncated, with a few bytes overwritten, replaced by garbage, or by a huge-dimensions header."""
    if how == "truncated":
        return data[:draw(st.integers(0, max(len(data) - 1, 0)))]
    if how == "flipped":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
        return bytes(out)
    if how == "garbage":
        return draw(st.binary(max_size=64))
    assert how == "huge"
    return png_header(draw(st.sampled_from([0, 70_000, 2**31 - 1])), draw(st.sampled_from([1, 70_000, 2**31 - 1])))


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_text if isinstance(data, str) else path.write_bytes)(data)
    return path


# ---------------------------------------------------------------------------------------------- the contract
@dataclass
class Case:
    root: Path
    fmt: str
    culprits: list[tuple[str, ...]] = field(default_factory=list)  # each: one of these names must be in the error
    loose: set[str] = field(default_factory=set)  # corrupted, but Pillow may still read it: named or not
    clean: set[str] = field(default_factory=set)  # names of valid items: never in the error (when nothing is loose)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # item id -> displayed (w, h)
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # item id -> the class map it must read back as
    labels: dict[str, str] = field(default_factory=dict)  # item id -> label

    def culprit(self, *names: str) -> None:
        self.culprits.append(names)
        self.clean -= set(names)

    def maybe(self, name: str) -> None:
        self.loose.add(name)
        self.clean.discard(name)


def check(case: Case, **kw) -> None:
    """Load (validating), then walk every item as training does; see the module docstring for the contract."""
    CASES[case.fmt] += 1
    try:
        data = load_real_data(case.root, **kw)
    except DataError as e:
        CASES[f"{case.fmt}:reported"] += 1
        msg = str(e)
        assert case.culprits or case.loose, f"valid {case.fmt} data reported:\n{msg}"
        for names in case.culprits:
            assert any(n in msg for n in names), f"{names} not named in:\n{msg}"
        if not case.loose:
            named = sorted(n for n in case.clean if n in msg)
            assert not named, f"valid {named} named in:\n{msg}"
        return
    CASES[f"{case.fmt}:loaded"] += 1
    assert not case.culprits, f"{case.culprits} not reported"
    ids = {item.id for item in data.items}
    for item in data.items:
        loose = any(t in item.source for t in case.loose)
        with item.load() as im:
            rgb = to_array(im, 3)
            gray = to_array(im, 1)
        h, w = rgb.shape[:2]
        assert rgb.shape == (h, w, 3) and gray.shape == (h, w) and rgb.dtype == gray.dtype == np.uint8
        if item.id in case.sizes and not loose:
            assert (w, h) == case.sizes[item.id], item.id
        if item.mask is not None:
            mask = item.mask((w, h))
            assert mask.shape == (h, w) and mask.dtype == np.uint8, (item.id, mask.shape, mask.dtype)
            if data.seg_classes:
                assert int(mask.max(initial=0)) < len(data.seg_classes)
            if item.id in case.masks and not loose:
                np.testing.assert_array_equal(mask, case.masks[item.id], err_msg=item.id)
        else:
            assert not case.masks, f"{item.id}: no mask"
        if data.has_labels:
            assert 0 <= data.label_index(item) < len(data.cls_classes), (item.id, item.label)
        if item.id in case.labels:
            assert item.label == case.labels[item.id], item.id
    assert set(split_ids(data, 0.3, 0)) == ids


def mark_image(case: Case, d, token: str, path: Path, data: bytes, how: str) -> None:
    """Write ``data`` broken as ``how`` to ``path``: a culprit when Pillow cannot read it, else loose."""
    bad = d(broken_bytes(data, how))
    write(path, bad)
    case.maybe(token) if decodes(bad) else case.culprit(token)


@contextmanager
def temp_case(data, name: str, fmt: str) -> Iterator[tuple[Callable, Path, Case]]:
    """``data``'s draw, a folder ``name`` (not made yet) in a temporary directory, and a Case of ``fmt`` for it."""
    with tempfile.TemporaryDirectory() as tmp:
        case = Case(Path(tmp) / name, fmt)
        yield data.draw, case.root, case


# ---------------------------------------------------------------------------------------------- canonical
LABELS = ("good", "crack", "dent")
CANONICAL_CORRUPTIONS = ("image_garbage", "image_truncated", "image_flipped", "image_huge", "image_dup",
                         "mask_garbage", "mask_truncated", "mask_flipped", "mask_size", "mask_color", "mask_16bit",
                         "mask_value", "mask_orphan", "mask_jpg", "labels_unknown", "labels_header",
                         "labels_missing", "splits_unknown", "classes_utf8")


def draw_canonical(d, root: Path) -> tuple[Case, dict]:
    case = Case(root, "canonical")
    n = d(st.integers(1, 4))
    binary = d(st.booleans())
    k = 1 if binary else d(st.integers(1, 4))
    with_masks, with_labels, with_splits = d(st.booleans()), d(st.booleans()), d(st.booleans())
    items = {}
    for j in range(n):
        i = f"im{j:02d}q"
        img = d(images())
        write(root / "images" / f"{i}{img.ext}", img.data)
        case.sizes[i], case.clean = img.shown, case.clean | {i}
        items[i] = img
        if with_masks and d(st.integers(0, 3)):
            data, truth = d(class_maps(img.shown, binary, k))
            write(root / "masks" / f"{i}{d(st.sampled_from(['.png', '.png', '.PNG']))}", data)
            case.masks[i] = truth
    if case.masks:
        case.masks.update({i: np.zeros(img.shown[::-1], np.uint8) for i, img in items.items() if i not in case.masks})
    classes = not binary and d(st.booleans())
    if classes:
        write(root / "classes.txt", "background\n" + "".join(f"c{c}\n" for c in range(1, k + 1)))
    if with_labels:
        case.labels = {i: d(st.sampled_from(LABELS)) for i in items}
        write(root / "labels.csv", "id,label\n" + "".join(f"{i},{lab}\n" for i, lab in case.labels.items()))
    if with_splits:
        write(root / "splits.csv", "id,split\n" + "".join(f"{i},{d(st.sampled_from(['train', 'test']))}\n"
                                                          for i in items))
    if d(st.integers(0, 3)) == 0:  # macOS resource forks and hidden files are not images
        write(root / "images" / f"._{next(iter(items))}.png", b"\x00\x05\x16\x07junk")
    return case, dict(items=items, binary=binary, k=k, classes=classes)


@fuzz(60)
@given(st.data())
def test_canonical_valid_variants(data):
    with tempfile.TemporaryDirectory() as tmp:
        case, _ = draw_canonical(data.draw, Path(tmp) / "canonical")
        check(case)


def corrupt_canonical(d, case: Case, meta: dict, kind: str, free: list[str]) -> None:
    root, items, binary = case.root, meta["items"], meta["binary"]
    ghost = f"ghost{len(case.culprits):02d}q"
    if kind.startswith(("image_", "mask_")) and kind != "mask_orphan":
        if not free:
            return
        i = free.pop(d(st.integers(0, len(free) - 1)))
        img = items[i]
        w, h = img.shown
        if kind.startswith("mask_"):  # this mask is replaced; the others read as before, or empty
            for p in (root / "masks").glob(f"{i}.*"):
                p.unlink()
            for j, other in items.items():
                case.masks.setdefault(j, np.zeros(other.shown[::-1], np.uint8))
            case.masks.pop(i, None)
        mask_png = root / "masks" / f"{i}.png"
        if kind in ("image_garbage", "image_truncated", "image_flipped", "image_huge"):
            mark_image(case, d, i, root / "images" / f"{i}{img.ext}", img.data, kind[6:])
        elif kind == "image_dup":  # two images with one id
            other = ".bmp" if img.ext.lower() != ".bmp" else ".png"
            write(root / "images" / f"{i}{other}", encode(Image.new("L", (w, h)), other))
            case.culprit(i)
        elif kind in ("mask_garbage", "mask_truncated", "mask_flipped"):
            good = encode(mask_image(np.zeros((h, w), np.uint8), "L", binary), ".png")
            mark_image(case, d, i, mask_png, good, kind[5:])
        elif kind == "mask_size":
            size = d(st.sampled_from([(w + 1, h), (w, h + 1)] + ([(h, w)] if h != w else [])))
            write(mask_png, encode(Image.new("L", size), ".png"))
            case.culprit(i)
        elif kind == "mask_color":  # a colour-coded mask: classes are not colours
            a = np.zeros((h, w, 3), np.uint8)
            a[0, 0] = d(st.sampled_from([(255, 0, 0), (0, 128, 0), (10, 20, 30)]))
            write(mask_png, encode(Image.fromarray(a), ".png"))
            case.culprit(i)
        elif kind == "mask_16bit":  # a 16-bit value no class id can be
            a = np.zeros((h, w), np.uint16)
            a[0, 0] = d(st.integers(256, 65534))
            write(mask_png, encode(Image.fromarray(a), ".png"))
            case.culprit(i)
        elif kind == "mask_value":
            a = np.zeros((h, w), np.uint8)
            if meta["classes"]:  # above the classes of classes.txt
                a[0, 0] = d(st.integers(meta["k"] + 1, 255))
            elif binary and w * h > 1:  # neither 0 nor 255 in 0/255 masks
                a.flat[0], a.flat[1] = 255, d(st.integers(1, 254))
            else:  # any value is a class: not a corruption here
                write(mask_png, encode(Image.fromarray(a), ".png"))
                case.masks[i] = a
                return
            write(mask_png, encode(Image.fromarray(a), ".png"))
            case.culprit(i)
        elif kind == "mask_jpg":  # a lossy mask, once passed over: its image trained as defect-free
            write(root / "masks" / f"{i}.jpg", encode(Image.new("L", (w, h)), ".jpg"))
            case.culprit(i)
        return
    if kind == "mask_orphan":
        write(root / "masks" / f"{ghost}.png", encode(Image.new("L", (3, 2)), ".png"))
        for j, other in items.items():
            case.masks.setdefault(j, np.zeros(other.shown[::-1], np.uint8))
        case.culprit(ghost)
    elif kind in ("labels_unknown", "labels_header", "labels_missing"):
        if meta.get("labels_broken"):
            return
        meta["labels_broken"] = True
        labels = case.labels or {i: "good" for i in items}
        if kind == "labels_missing":
            if not free:
                return
            i = free.pop(0)
            labels = {j: lab for j, lab in labels.items() if j != i}
            case.culprit(i)
        if kind == "labels_unknown":
            labels = {**labels, ghost: "crack"}
            case.culprit(ghost)
        header = "id,label"
        if kind == "labels_header":
            header = d(st.sampled_from(["id,lbl", "image,label", "label", "id;label", ""]))
            case.culprit("labels.csv")
        write(root / "labels.csv", header + "\n" + "".join(f"{i},{lab}\n" for i, lab in labels.items()))
        case.labels = {}
    elif kind == "splits_unknown":
        if not (root / "splits.csv").is_file():
            write(root / "splits.csv", "id,split\n" + "".join(f"{i},train\n" for i in items))
        with open(root / "splits.csv", "a") as f:
            f.write(f"{ghost},test\n")
        case.culprit(ghost)
    elif kind == "classes_utf8":
        if not (root / "masks").is_dir() or not any(p.suffix.lower() == ".png" for p in (root / "masks").iterdir()):
            write(root / "masks" / f"{next(iter(items))}.png",
                  encode(Image.new("L", items[next(iter(items))].shown), ".png"))
            for j, other in items.items():
                case.masks.setdefault(j, np.zeros(other.shown[::-1], np.uint8))
        write(root / "classes.txt", b"background\n\xff\xfe\xfa scratch\n")
        case.culprit("classes.txt")


@fuzz(100)
@given(st.data())
def test_canonical_corruptions(data):
    d = data.draw
    with tempfile.TemporaryDirectory() as tmp:
        case, meta = draw_canonical(d, Path(tmp) / "canonical")
        free = list(meta["items"])
        kinds = d(st.lists(st.sampled_from(CANONICAL_CORRUPTIONS), min_size=1, max_size=3))
        if "mask_value" in kinds:  # an unreadable classes.txt changes which values are classes
            kinds = [k for k in kinds if k != "classes_utf8"]
        kinds.sort(key=lambda k: k == "classes_utf8")  # last: it needs a mask file to be read at all
        for kind in kinds:
            corrupt_canonical(d, case, meta, kind, free)
        check(case)


# Rows of labels.csv / splits.csv that once crashed _read_csv (AttributeError, UnicodeDecodeError), and a splits.csv
# header that once raised before the other problems were collected.
@pytest.mark.parametrize("name,text", [
    ("labels.csv", b"id,label\nim00q\n"),  # a row without its label field
    ("labels.csv", b"id,label\nim00q,cr\xffack\n"),  # not UTF-8
    ("splits.csv", b"id,split\nim00q\n"),
    ("splits.csv", b"id,split\nim00q,t\xe9st\n"),
])
def test_canonical_csv_rows(tmp_path, name, text):
    root = tmp_path / "c"
    write(root / "images" / "im00q.png", encode(Image.new("L", (4, 3)), ".png"))
    write(root / name, text)
    case = Case(root, "canonical")
    case.culprit(name)
    check(case)


def test_canonical_csv_problems_are_collected_with_the_others(tmp_path):
    """A bad splits.csv header is one problem among the others, not an early raise that hides them."""
    root = tmp_path / "c"
    write(root / "images" / "im00q.png", b"junk")
    write(root / "splits.csv", "id,fold\nim00q,1\n")
    case = Case(root, "canonical")
    case.culprit("splits.csv")
    case.culprit("im00q")
    check(case)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_exif_rotated_image_and_mask_in_displayed_orientation(tmp_path, ext):
    """The rule: masks are drawn on the displayed image (EXIF-transposed), as labelme and most tools draw them.
    (Pillow turns a TIFF itself as it loads, but not when it loads it from a path: images are read from bytes.)"""
    from PIL import ImageOps

    stored = np.zeros((4, 6), np.uint8)  # 6 wide, 4 high as stored; 4 wide, 6 high as displayed (orientation 6)
    stored[0, 1] = 200
    data = encode(Image.fromarray(stored), ext, orientation=6)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    assert shown.shape == (6, 4) and shown_size(Image.open(io.BytesIO(data))) == (4, 6)  # loaded or not
    root = tmp_path / "c"
    write(root / "images" / f"rot{ext}", data)
    write(root / "masks" / "rot.png", encode(Image.fromarray((shown == 200).astype(np.uint8)), ".png"))
    d = load_real_data(root)
    with d.items[0].load() as im:
        image = to_array(im, 1)
    mask = d.items[0].mask(image.shape[::-1])
    assert image.shape == mask.shape == (6, 4) and image[mask == 1].tolist() == [200]
    write(root / "masks" / "rot.png", encode(Image.fromarray((stored == 200).astype(np.uint8)), ".png"))
    with pytest.raises(DataError, match=rf"rot\{ext}: mask is 6x4, image is 4x6"):
        load_real_data(root)


# ---------------------------------------------------------------------------------------------- imagefolder
@fuzz(50)
@given(st.data())
def test_imagefolder(data):
    d = data.draw
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "folders"
        case = Case(root, "imagefolder")
        classes = d(st.lists(st.sampled_from(["good", "scratch", "Dent", "oil spot"]), min_size=1, max_size=3,
                             unique=True))
        n = 0
        for c in classes:
            for _ in range(d(st.integers(1, 3))):
                img = d(images())
                stem = f"if{n:02d}q"
                n += 1
                write(root / c / f"{stem}{img.ext}", img.data)
                case.sizes[f"{c}/{stem}"] = img.shown
                case.labels[f"{c}/{stem}"] = c
                case.clean.add(stem)
                if d(st.integers(0, 2)) == 0:
                    how = d(st.sampled_from(["garbage", "truncated", "flipped", "huge"]))
                    mark_image(case, d, stem, root / c / f"{stem}{img.ext}", img.data, how)
        if d(st.booleans()):  # hidden folders and files (notebook checkpoints, macOS forks) are not classes/images
            write(root / ".ipynb_checkpoints" / "if99q.png", b"junk")
            write(root / classes[0] / "._if98q.png", b"\x00\x05\x16\x07junk")
            case.clean |= {"if99q", "if98q"}
        check(case)


# ---------------------------------------------------------------------------------------------- Hugging Face
HF_CORRUPTIONS = ("image_garbage", "image_truncated", "image_none", "mask_garbage", "mask_size", "mask_none",
                  "label_minus_one", "label_none", "file_arrow", "file_info", "file_state")


@fuzz(40)
@given(st.data(), st.booleans())
def test_hf(data, corrupt):
    import datasets

    with temp_case(data, "hfdata", "hf") as (d, root, case):
        n = d(st.integers(1, 4))
        label_kind = d(st.sampled_from(["none", "classlabel", "string", "int"]))
        with_mask = d(st.booleans())
        binary = d(st.booleans())
        k = 1 if binary else d(st.integers(1, 3))
        rows = {"image": []}
        if with_mask:
            rows["mask"] = []
        if label_kind != "none":
            rows["label"] = []
        names = ["ok", "nok", "dent"]
        for r in range(n):
            img = d(images(exts=(".png", ".jpg", ".tif", ".webp")))
            rid = f"{r:06d}"
            rows["image"].append({"bytes": img.data, "path": None})
            case.sizes[rid] = img.shown
            if with_mask:
                png, truth = d(class_maps(img.shown, binary, k))
                rows["mask"].append({"bytes": png, "path": None})
                case.masks[rid] = truth
            if label_kind != "none":
                v = d(st.integers(0, 2))
                rows["label"].append(str(v) if label_kind == "string" else v)
                case.labels[rid] = names[v] if label_kind == "classlabel" else str(v)
        file_kind = None
        free = list(range(n))
        for kind in d(st.lists(st.sampled_from(HF_CORRUPTIONS), min_size=1, max_size=2)) if corrupt else []:
            if not free:
                break
            r = free.pop(d(st.integers(0, len(free) - 1)))
            token = f"#{r}"
            if kind.startswith("file_"):
                file_kind = kind
                case.culprit(root.name)
            elif kind == "image_none":
                rows["image"][r] = None
                case.culprit(token)
            elif kind.startswith("image_"):
                bad = d(broken_bytes(rows["image"][r]["bytes"], kind[6:]))
                rows["image"][r] = {"bytes": bad, "path": None}
                case.maybe(token) if decodes(bad) else case.culprit(token)
            elif kind.startswith("mask_") and with_mask:
                w, h = case.sizes[f"{r:06d}"]
                if kind == "mask_none":  # no mask: defect-free, like an image without a mask file
                    rows["mask"][r] = None
                    case.masks[f"{r:06d}"] = np.zeros((h, w), np.uint8)
                    continue
                bad = b"junk" if kind == "mask_garbage" else encode(Image.new("L", (w + 1, h)), ".png")
                rows["mask"][r] = {"bytes": bad, "path": None}
                case.culprit(token)
            elif kind.startswith("label_") and label_kind in ("classlabel", "int"):
                rows["label"][r] = -1 if kind == "label_minus_one" and label_kind == "classlabel" else None
                case.culprit(token)
        features = {"image": datasets.Image()}
        if with_mask:
            features["mask"] = datasets.Image()
        if label_kind != "none":
            features["label"] = {"classlabel": datasets.ClassLabel(names=names), "string": datasets.Value("string"),
                                 "int": datasets.Value("int64")}[label_kind]
        if file_kind:  # the folder is unreadable: its rows need not be named
            for row in [c for c in case.culprits if c != (root.name,)]:
                case.culprits.remove(row)
                case.maybe(row[0])
        datasets.Dataset.from_dict(rows, features=datasets.Features(features)).save_to_disk(str(root))
        if file_kind == "file_arrow":
            arrow = next(root.glob("*.arrow"))
            write(arrow, d(broken_bytes(arrow.read_bytes(), d(st.sampled_from(["truncated", "garbage"])))))
        elif file_kind == "file_info":
            write(root / "dataset_info.json", d(st.sampled_from(['{"features": 3', "[]", '{"features": {"image": '
                                                                 '{"_type": "Nope"}}}'])))
        elif file_kind == "file_state":
            (root / "state.json").unlink()
        check(case)


# ---------------------------------------------------------------------------------------------- synthvit shards
SHARD_CORRUPTIONS = ("image_garbage", "image_truncated", "image_flipped", "mask_garbage", "mask_size", "mask_value",
                     "mask_16bit", "cls_range", "cls_negative", "cls_text", "member_missing", "shard_missing",
                     "shard_garbage", "shard_truncated", "info_garbage", "info_types", "info_lengths")


def tar_bytes(samples: list[dict]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for s in samples:
            for ext, value in s.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                    info.size = len(value)
                    tar.addfile(info, io.BytesIO(value))
    return buf.getvalue()


@fuzz(50)
@given(st.data(), st.booleans())
def test_shards(data, corrupt):
    with temp_case(data, "shards", "shards") as (d, root, case):
        k = d(st.integers(1, 3))
        class_names = ["good", "scratch", "dent", "pit"][:k + 1]
        shards, index = [], 0
        for s in range(d(st.integers(1, 2))):
            samples = []
            for _ in range(d(st.integers(1, 3))):
                key = f"k{index:03d}q"
                index += 1
                img = d(images(exts=(".png", ".jpg"), exif=False))
                png, truth = d(class_maps(img.shown, False, k, modes=("L", "P", "I;16")))
                cls = d(st.integers(0, k))
                samples.append({"__key__": key, img.ext.lower()[1:]: img.data, "mask.png": png,
                                "cls": str(cls).encode(), "json": b"{}"})
                case.sizes[key], case.masks[key], case.labels[key] = img.shown, truth, class_names[cls]
                case.clean.add(key)
            shards.append((f"fz-{s:06d}.tar", samples))
        info = make_info("fz", [(f, len(ss), "0" * 64) for f, ss in shards], class_names, {"backend": "test"}).to_json()
        corruptions = d(st.lists(st.sampled_from(SHARD_CORRUPTIONS), min_size=1, max_size=2)) if corrupt else []
        after = []
        for kind in corruptions:
            f, samples = shards[d(st.integers(0, len(shards) - 1))]
            s = samples[d(st.integers(0, len(samples) - 1))]
            key = s["__key__"]
            image_key = "jpg" if "jpg" in s else "png"
            if kind in ("image_garbage", "image_truncated", "image_flipped") and image_key in s:
                s[image_key] = d(broken_bytes(s[image_key], kind[6:]))
                case.maybe(key) if decodes(s[image_key]) else case.culprit(key)
            elif kind == "mask_garbage":
                s["mask.png"] = d(st.binary(max_size=32))
                case.culprit(key)
            elif kind == "mask_size":
                w, h = case.sizes[key]
                s["mask.png"] = encode(Image.new("L", (w, h + 1)), ".png")
                case.culprit(key)
            elif kind in ("mask_value", "mask_16bit"):
                w, h = case.sizes[key]
                a = np.zeros((h, w), np.uint16 if kind == "mask_16bit" else np.uint8)
                a[0, 0] = d(st.integers(256, 65534)) if kind == "mask_16bit" else d(st.integers(k + 1, 255))
                s["mask.png"] = encode(Image.fromarray(a), ".png")
                case.culprit(key)
            elif kind.startswith("cls_"):
                s["cls"] = {"cls_range": str(k + 1 + d(st.integers(0, 5))).encode(), "cls_negative": b"-1",
                            "cls_text": d(st.sampled_from([b"scratch", b"", b"1.5", b"\xff"]))}[kind]
                case.culprit(key)
                case.labels.pop(key, None)
            elif kind == "member_missing":
                s.pop(d(st.sampled_from(sorted(m for m in s if m in ("jpg", "png", "mask.png", "cls")))))
                case.culprit(key)
            elif kind.startswith(("shard_", "info_")):
                after.append((kind, f))
                case.culprit(f if kind.startswith("shard_") else "_info.json")
        for kind, f in after:  # samples of a lost shard (all, when _info.json is lost): named or not
            if kind != "info_lengths":
                gone = {s["__key__"] for ff, ss in shards if kind.startswith("info_") or ff == f for s in ss}
                case.culprits = [c for c in case.culprits if c[0] not in gone
                                 and not (kind.startswith("info_") and c[0].startswith("fz-"))]
                for key in gone:
                    case.maybe(key)
        for f, samples in shards:
            write(root / f, tar_bytes(samples))
        for kind, f in after:
            if kind == "shard_missing":
                (root / f).unlink(missing_ok=True)
            elif kind == "shard_garbage":
                write(root / f, d(st.binary(max_size=600)))
            elif kind == "shard_truncated":  # cut inside the last member's data or earlier: samples are lost
                full = tar_bytes(dict(shards)[f])
                with tarfile.open(fileobj=io.BytesIO(full)) as tar:
                    end = max(m.offset_data + m.size for m in tar.getmembers())
                write(root / f, full[:d(st.integers(0, end - 1))])
            elif kind == "info_lengths":
                info["splits"]["train"]["shard_lengths"] = [n + 1 for n in info["splits"]["train"]["shard_lengths"]]
            elif kind == "info_types":
                what = d(st.sampled_from(["class_names", "splits", "filenames", "lengths"]))
                if what == "class_names":
                    info["class_names"] = d(st.sampled_from([{"0": "good"}, "good,scratch", [], [0, 1, 2, 3], None]))
                elif what == "splits":
                    info["splits"] = d(st.sampled_from([[], "train", None, {"train": []}]))
                elif what == "filenames":
                    info["splits"]["train"]["filenames"] = d(st.sampled_from(["fz-000000.tar", 3, None, [3]]))
                else:
                    info["splits"]["train"]["shard_lengths"] = d(st.sampled_from(["2", None, [None]]))
        if any(kind == "info_garbage" for kind, _ in after):
            write(root / "_info.json", d(st.sampled_from(['{"name": ', "[]", "3", "null", '"x"'])))
        else:
            write(root / "_info.json", json.dumps(info))
        check(case)


# ---------------------------------------------------------------------------------------------- labelme
# Read by finetune/annotations.py (read_labelme, shapes_mask); the COCO family below likewise (read_coco).
LABELME_CORRUPTIONS = ("json_garbage", "json_utf8", "json_toplevel", "shapes_type", "shape_type", "label_missing",
                       "label_type", "points_type", "points_coords", "rect_points", "shape_kind", "image_path_type",
                       "image_missing", "image_garbage", "image_truncated", "coords_extreme")


LABELME_KINDS = {"polygon": (3, 6), "rectangle": (2, 2), "circle": (2, 2), "line": (2, 2), "linestrip": (2, 4),
                 "point": (1, 1), None: (3, 4)}  # shape_type -> points (None: labelme < 3, a polygon)


def labelme_shape(d, w: int, h: int) -> dict:
    kind = d(st.sampled_from(list(LABELME_KINDS)))
    coord = st.floats(0, max(w - 1, 0), allow_nan=False) if d(st.booleans()) else st.integers(0, max(w - 1, 0))
    ycoord = st.floats(0, max(h - 1, 0), allow_nan=False) if d(st.booleans()) else st.integers(0, max(h - 1, 0))
    n = d(st.integers(*LABELME_KINDS[kind]))
    points = [[d(coord), d(ycoord)] for _ in range(n)]  # rectangles: corners in either order, as drawn
    return {"label": d(st.sampled_from(["scratch", "dent", "pit"])), "points": points, "group_id": None,
            "description": "", "shape_type": kind, "flags": {}}


def draw_labelme(d, root: Path) -> tuple[Case, dict]:
    case = Case(root, "labelme")
    docs = {}
    out = d(st.sampled_from(["", "", "ann/"]))  # JSONs beside the images, or in a folder (labelme --output)
    for j in range(d(st.integers(1, 3))):
        stem = f"lm{j:02d}q"
        img = d(images())
        w, h = img.shown
        write(root / f"{stem}{img.ext}", img.data)
        doc = {"version": "5.4.1", "flags": {}, "shapes": [labelme_shape(d, w, h) for _ in range(d(st.integers(0, 3)))],
               "imagePath": f"{'../' if out else ''}{stem}{img.ext}", "imageData": None, "imageHeight": h,
               "imageWidth": w, "__out__": out}
        docs[stem] = (img, doc)
        case.sizes[stem] = img.shown
        case.clean.add(stem)
    return case, docs


def write_labelme(root: Path, docs: dict) -> None:
    out = next((doc["__out__"] for _, doc in docs.values() if isinstance(doc, dict) and "__out__" in doc), "")
    for stem, (_, doc) in docs.items():
        if isinstance(doc, dict):
            doc = {k: v for k, v in doc.items() if k != "__out__"}
        write(root / f"{out}{stem}.json", doc if isinstance(doc, bytes) else json.dumps(doc))


@fuzz(40)
@given(st.data())
def test_labelme_valid_variants(data):
    with tempfile.TemporaryDirectory() as tmp:
        case, docs = draw_labelme(data.draw, Path(tmp) / "lm")
        write_labelme(case.root, docs)
        check(case)


def corrupt_labelme(d, case: Case, docs: dict, stem: str, kind: str) -> None:
    img, doc = docs[stem]
    w, h = img.shown
    shapes = doc["shapes"] = doc["shapes"] or [labelme_shape(d, w, h)]
    s = shapes[d(st.integers(0, len(shapes) - 1))]
    bad = {"json_garbage": lambda: d(st.sampled_from([b"{", b"\x00\x01", b"", b"shapes: []"])),
           "json_utf8": lambda: json.dumps(doc).encode().replace(b'"flags"', b'"fl\xffags"'),
           "json_toplevel": lambda: json.dumps(d(st.sampled_from([[], [doc], 3, "x", None]))).encode()}
    if kind in bad:
        docs[stem] = (img, bad[kind]())
    elif kind == "shapes_type":
        doc["shapes"] = d(st.sampled_from([{}, {"0": s}, "polygon", 3, None]))
    elif kind == "shape_type":
        shapes[shapes.index(s)] = d(st.sampled_from([3, "polygon", None, [s]]))
    elif kind == "label_missing":
        del s["label"]
    elif kind == "label_type":
        s["label"] = d(st.sampled_from([3, 1.5, None, ["a"], {"a": 1}, True]))
    elif kind == "points_type":
        s["points"] = d(st.sampled_from(["1,2,3,4", {"x": 1, "y": 2}, 3, None, [1, 2, 3, 4, 5, 6],
                                         [["1", "2"], ["3", "4"], ["5", "6"]]]))
    elif kind == "points_coords":
        s["points"] = d(st.sampled_from([[[1], [2], [3]], [[1, 2, 3], [4, 5, 6], [7, 8, 9]], [[1, None], [2, 3],
                                                                                                [4, 5]]]))
    elif kind == "rect_points":
        s["shape_type"] = "rectangle"
        s["points"] = [[1, 1]] * d(st.sampled_from([0, 1, 3]))
    elif kind == "shape_kind":
        s["shape_type"] = d(st.sampled_from(["ellipse", "Polygon", 7, ["polygon"]]))
    elif kind == "image_path_type":
        doc["imagePath"] = d(st.sampled_from([3, ["a.png"], {"p": 1}]))
        if d(st.booleans()):
            return case.maybe(stem)  # the image beside the JSON is found: reported or not, never a crash
        (case.root / f"{stem}{img.ext}").unlink()  # ... and no image under the JSON's own stem either
    elif kind == "image_missing":
        (case.root / f"{stem}{img.ext}").unlink()
        doc["imagePath"] = d(st.sampled_from([None, "gone.png", "../x/gone.png"]))
    elif kind in ("image_garbage", "image_truncated"):
        mark_image(case, d, stem, case.root / f"{stem}{img.ext}", img.data, kind[6:])
        return
    elif kind == "coords_extreme":  # outside the image: clipped, or reported; never a crash
        s["points"] = [[d(st.sampled_from([-1e6, -1, 1e9, 1e308, 2**63])), d(st.integers(-5, h + 5))]
                       for _ in s["points"]]
        return case.maybe(stem)
    case.culprit(stem)


@fuzz(80)
@given(st.data())
def test_labelme_corruptions(data):
    d = data.draw
    with tempfile.TemporaryDirectory() as tmp:
        case, docs = draw_labelme(d, Path(tmp) / "lm")
        stems = list(docs)
        for kind in d(st.lists(st.sampled_from(LABELME_CORRUPTIONS), min_size=1, max_size=2)):
            if stems:
                corrupt_labelme(d, case, docs, stems.pop(d(st.integers(0, len(stems) - 1))), kind)
        write_labelme(case.root, docs)
        check(case)


# One minimal example per finding of the fuzzing, all fixed by the annotations.py rewrite; most crashed (KeyError,
# TypeError, AttributeError, UnicodeDecodeError, ValueError) or passed silently: (id, document or raw bytes, expected
# outcome): "bad" must be one DataError naming a.json or a.png, "ok" must load, "either" must not crash.
def _lm(**kw):
    shape = {"label": "scratch", "points": [[1, 1], [6, 1], [6, 4]], "shape_type": "polygon"}
    shape.update(kw.pop("shape", {}))
    return {"shapes": [shape], "imagePath": "a.png", "imageHeight": 6, "imageWidth": 8, **kw}


LABELME_MINIMAL = [
    ("rectangle_drawn_right_to_left", _lm(shape={"shape_type": "rectangle", "points": [[6, 4], [1, 1]]}), "ok"),
    ("no_shapes_at_all", _lm(shapes=[]), "ok"),
    ("windows_image_path", _lm(imagePath="..\\images\\a.png"), "ok"),
    ("not_utf8", json.dumps(_lm()).encode().replace(b'"imagePath"', b'"image\xffPath"'), "bad"),
    ("top_level_list", [], "bad"),
    ("top_level_null", None, "bad"),
    ("shapes_null", _lm(shapes=None), "bad"),
    ("shapes_dict", _lm(shapes={}), "bad"),
    ("shapes_string", _lm(shapes="polygon"), "bad"),
    ("shape_number", _lm(shapes=[3]), "bad"),
    ("label_missing", {"shapes": [{"points": [[1, 1], [6, 1], [6, 4]]}], "imagePath": "a.png"}, "bad"),
    ("label_number", _lm(shape={"label": 3}), "bad"),
    ("label_null", _lm(shape={"label": None}), "bad"),
    ("label_list", _lm(shape={"label": ["a"]}), "bad"),
    ("points_null", _lm(shape={"points": None}), "bad"),
    ("points_number", _lm(shape={"points": 3}), "bad"),
    ("points_flat_numbers", _lm(shape={"points": [1, 1, 6, 1, 6, 4]}), "bad"),
    ("points_dict", _lm(shape={"points": {"x": 1, "y": 2}}), "bad"),
    ("points_string", _lm(shape={"points": "1,1,6,1,6,4"}), "bad"),
    ("points_numeric_strings", _lm(shape={"points": [["1", "1"], ["6", "1"], ["6", "4"]]}), "bad"),
    ("point_with_one_coordinate", _lm(shape={"points": [[1], [6], [6]]}), "bad"),
    ("point_with_null", _lm(shape={"points": [[1, None], [6, 1], [6, 4]]}), "bad"),
    ("rectangle_one_point", _lm(shape={"shape_type": "rectangle", "points": [[1, 1]]}), "bad"),
    ("image_path_number", _lm(imagePath=3), "either"),  # a.png is beside it: found by stem, or reported
    ("image_path_list", _lm(imagePath=["a.png"]), "either"),
    ("image_path_outside_folder", _lm(imagePath="../x/gone.png"), "either"),
    ("more_than_255_labels", _lm(shapes=[{"label": f"c{i:03d}", "points": [[1, 1], [6, 1], [6, 4]]}
                                         for i in range(300)]), "bad"),  # uint8 masks: class 256+ wrapped silently
    ("coordinates_huge", _lm(shape={"points": [[1e308, 1], [6, -1e308], [2**64, 4]]}), "either"),
    ("coordinates_nan", json.dumps(_lm()).replace("[1, 1]", "[NaN, Infinity]").encode(), "either"),
    ("polygon_two_points", _lm(shape={"points": [[1, 1], [6, 4]]}), "either"),
]


@pytest.mark.parametrize("doc,expect", [c[1:] for c in LABELME_MINIMAL], ids=[c[0] for c in LABELME_MINIMAL])
def test_labelme_minimal(tmp_path, doc, expect):
    root = tmp_path / "lm"
    write(root / "a.png", encode(Image.new("L", (8, 6), 100), ".png"))
    write(root / "a.json", doc if isinstance(doc, bytes) else json.dumps(doc))
    case = Case(root, "labelme")
    if expect == "bad":
        case.culprit("a.json", "a.png")
    elif expect == "either":
        case.maybe("a.")
    check(case)


def test_labelme_output_folder_whose_jsons_are_all_broken(tmp_path):
    """``labelme --output ann/`` with every JSON broken: still labelme, the JSON named (detect_format took the
    folder for an imagefolder: "no images found (imagefolder layout)")."""
    root = tmp_path / "lm"
    write(root / "a.png", encode(Image.new("L", (8, 6), 100), ".png"))
    write(root / "ann" / "a.json", b"{")
    case = Case(root, "labelme")
    case.culprit("a.json")
    check(case)


# ---------------------------------------------------------------------------------------------- COCO
COCO_CORRUPTIONS = ("categories_type", "category_keys", "images_type", "image_keys", "file_name_type",
                    "annotations_type", "annotation_keys", "annotation_image", "annotation_category",
                    "segmentation_type", "polygon_flat", "polygon_values", "polygon_odd", "rle_negative",
                    "rle_sum", "rle_types", "rle_string", "rle_size", "image_missing", "image_garbage",
                    "coords_extreme")


def draw_coco(d, root: Path) -> tuple[Case, dict]:
    case = Case(root, "coco")
    cat_ids = d(st.lists(st.integers(0, 99), min_size=1, max_size=3, unique=True))
    doc = {"info": {}, "licenses": [], "categories": [{"id": c, "name": f"cat{c}", "supercategory": ""}
                                                      for c in cat_ids], "images": [], "annotations": []}
    sub = d(st.sampled_from(["images/", ""]))
    for j in range(d(st.integers(1, 3))):
        stem = f"co{j:02d}q"
        img = d(images(exif=False))
        w, h = img.shown
        write(root / f"{sub}{stem}{img.ext}", img.data)
        doc["images"].append({"id": 100 + j, "file_name": f"{stem}{img.ext}", "width": w, "height": h})
        case.sizes[stem] = img.shown
        case.clean.add(stem)
        expect, exact = np.zeros((h, w), np.uint8), True
        for _ in range(d(st.integers(0, 3))):
            c = d(st.sampled_from(cat_ids))
            a = {"id": len(doc["annotations"]) + 1, "image_id": 100 + j, "category_id": c, "iscrowd": 0,
                 "area": 1.0, "bbox": [0, 0, 1, 1]}
            if d(st.booleans()):
                n = d(st.integers(3, 5))
                a["segmentation"] = [[v for _ in range(n) for v in (d(st.integers(0, w - 1)),
                                                                    d(st.integers(0, h - 1)))]]
                exact = False
            else:
                m = (np.random.default_rng(d(st.integers(0, 255))).random((h, w)) > 0.6).astype(np.uint8)
                counts = rle_counts(m)
                a["segmentation"] = {"size": [h, w], "counts": rle_string(counts) if d(st.booleans()) else counts}
                a["iscrowd"] = 1
                expect[m > 0] = sorted(cat_ids).index(c) + 1
            doc["annotations"].append(a)
        if exact:
            case.masks[stem] = expect
    return case, dict(doc=doc, sub=sub, name=d(st.sampled_from(["annotations.json", "instances_default.json"])))


@fuzz(40)
@given(st.data())
def test_coco_valid_variants(data):
    with tempfile.TemporaryDirectory() as tmp:
        case, meta = draw_coco(data.draw, Path(tmp) / "coco")
        write(case.root / meta["name"], json.dumps(meta["doc"]))
        check(case)


def corrupt_coco(d, case: Case, meta: dict, kind: str) -> None:
    doc, name = meta["doc"], meta["name"]
    j = d(st.integers(0, len(doc["images"]) - 1))
    im = doc["images"][j]
    stem = Path(im["file_name"]).stem
    w, h = im["width"], im["height"]
    anns = [a for a in doc["annotations"] if a["image_id"] == im["id"]]
    if not anns and kind not in ("categories_type", "category_keys", "images_type", "image_keys",
                                 "file_name_type", "annotations_type", "image_missing", "image_garbage"):
        anns = [{"id": 999, "image_id": im["id"], "category_id": doc["categories"][0]["id"],
                 "segmentation": [[0, 0, w, 0, w, h]], "iscrowd": 0}]
        doc["annotations"].append(anns[0])
    a = anns[d(st.integers(0, len(anns) - 1))] if anns else None
    case.masks.pop(stem, None)
    if kind == "categories_type":
        doc["categories"] = d(st.sampled_from([{}, "crack", None, [3], [[1, "crack"]]]))
    elif kind == "category_keys":
        c = doc["categories"][0]
        c.pop(d(st.sampled_from(["id", "name"])))
    elif kind == "images_type":
        doc["images"] = d(st.sampled_from([{}, "a.png", None, [3]]))
    elif kind == "image_keys":
        im.pop(d(st.sampled_from(["id", "file_name"])))
        case.clean.discard(stem)  # the broken entry may be shown with its file_name
    elif kind == "file_name_type":
        im["file_name"] = d(st.sampled_from([3, None, ["a.png"]]))
    elif kind == "annotations_type":
        doc["annotations"] = d(st.sampled_from([{}, "x", None, [3]]))
    elif kind == "annotation_keys":
        a.pop(d(st.sampled_from(["image_id", "category_id"])))
    elif kind == "annotation_image":  # an annotation of no image in the file
        a["image_id"] = d(st.sampled_from([999_999, "100", None]))
    elif kind == "annotation_category":
        a["category_id"] = d(st.sampled_from([1000, "1", None]))
    elif kind == "segmentation_type":
        a["segmentation"] = d(st.sampled_from([3, "polygon", {"size": [h, w]}, {"counts": None}, [None]]))
    elif kind == "polygon_flat":  # a list of numbers, not a list of polygons
        a["segmentation"] = [0, 0, w, 0, w, h]
    elif kind == "polygon_values":
        a["segmentation"] = [["0", "a", "1", "2", "3", "4"]]
    elif kind == "polygon_odd":
        a["segmentation"] = [[0, 0, w, 0, w, h, 1]]
    elif kind.startswith("rle_"):
        m = np.zeros((h, w), np.uint8)
        m[0, 0] = 1
        counts = rle_counts(m)
        if kind == "rle_negative":
            counts = [-2, h * w + 2] if len(counts) < 3 else [counts[0] + 3, -3, *counts[2:]]
        elif kind == "rle_sum":
            counts = counts[:-1] + [counts[-1] + d(st.sampled_from([-1, 1, 1000]))] if counts[-1] > 1 else \
                counts + [5]
        elif kind == "rle_types":
            counts = d(st.sampled_from([[str(c) for c in counts], [float(c) + 0.5 for c in counts], [None],
                                        {"0": 1}, 3]))
        elif kind == "rle_string":
            counts = d(st.sampled_from(["\x00\x01", "0a", "zzz", "~", "(", "3" * 5 + "\x7f", rle_string(counts)[:-1]
                                        + "p"]))
        a["segmentation"] = {"size": [h + 1, w] if kind == "rle_size" else [h, w], "counts": counts}
    elif kind == "image_missing":
        for p in case.root.rglob(f"{stem}.*"):
            p.unlink()
    elif kind == "image_garbage":
        p = next(case.root.rglob(f"{stem}.*"))
        write(p, b"junk")
    elif kind == "coords_extreme":
        a["segmentation"] = [[d(st.sampled_from([-1e6, 1e9, 1e308, 2**63])) for _ in range(6)]]
        return case.maybe(stem)
    if kind in ("image_missing", "image_garbage") or kind.startswith(("annotation_", "segmentation", "polygon",
                                                                      "rle_")):
        case.culprit(stem, name)  # the image or the annotation file
    else:
        case.culprit(name)


@fuzz(80)
@given(st.data())
def test_coco_corruptions(data):
    d = data.draw
    with tempfile.TemporaryDirectory() as tmp:
        case, meta = draw_coco(d, Path(tmp) / "coco")
        corrupt_coco(d, case, meta, d(st.sampled_from(COCO_CORRUPTIONS)))
        write(case.root / meta["name"], json.dumps(meta["doc"]))
        check(case, fmt="coco")


def _co(images=None, categories=None, **ann):
    a = {"id": 1, "image_id": 1, "category_id": 7, "segmentation": [[0, 0, 3, 0, 3, 2]], **ann}
    return {"images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 3}] if images is None else images,
            "categories": [{"id": 7, "name": "crack"}] if categories is None else categories,
            "annotations": [{k: v for k, v in a.items() if v is not ...}]}


COCO_MINIMAL = [  # (id, document or raw bytes, expected outcome, fmt): as LABELME_MINIMAL
    ("rle_list", _co(segmentation={"size": [3, 4], "counts": [1, 2, 9]}), "ok", "coco"),
    ("rle_string", _co(segmentation={"size": [3, 4], "counts": "129"}), "ok", "coco"),
    ("not_json_named", b"{", "bad", "coco"),
    ("not_json_auto_beside_images", b"{", "bad", "auto"),  # was auto-detected as canonical, silently
    ("categories_null", _co(categories=None) | {"categories": None}, "bad", "coco"),
    ("categories_string", _co() | {"categories": "crack"}, "bad", "coco"),
    ("category_number", _co(categories=[3]), "bad", "coco"),
    ("category_without_id", _co(categories=[{"name": "crack"}]), "bad", "coco"),
    ("category_without_name", _co(categories=[{"id": 7}]), "bad", "coco"),
    ("category_ids_str_and_int", _co(categories=[{"id": 7, "name": "crack"}, {"id": "8", "name": "dent"}]), "bad",
     "coco"),
    ("category_ids_duplicate", _co(categories=[{"id": 7, "name": "crack"}, {"id": 7, "name": "dent"}]), "bad",
     "coco"),
    ("category_name_number", _co(categories=[{"id": 7, "name": 3}]), "bad", "coco"),
    ("more_than_255_categories", _co(categories=[{"id": 7 + i, "name": f"c{i}"} for i in range(300)],
                                     category_id=306), "bad", "coco"),  # uint8 masks: class 300 was clipped
    ("images_null", _co() | {"images": None}, "bad", "coco"),
    ("image_number", _co(images=[3]), "bad", "coco"),
    ("image_without_file_name", _co(images=[{"id": 1}]), "bad", "coco"),
    ("image_without_id", _co(images=[{"file_name": "a.png"}]), "bad", "coco"),
    ("file_name_number", _co(images=[{"id": 1, "file_name": 3}]), "bad", "coco"),
    ("annotations_null", _co() | {"annotations": None}, "bad", "coco"),
    ("annotations_dict", _co() | {"annotations": {}}, "bad", "coco"),
    ("annotation_number", _co() | {"annotations": [3]}, "bad", "coco"),
    ("annotation_without_image_id", _co(image_id=...), "bad", "coco"),
    ("annotation_without_category_id", _co(category_id=...), "bad", "coco"),
    ("annotation_of_unknown_image", _co(image_id=999), "bad", "coco"),  # was dropped silently
    ("annotation_image_id_string", _co(image_id="1"), "bad", "coco"),  # was dropped silently
    ("category_id_list", _co(category_id=[7]), "bad", "coco"),
    ("segmentation_number", _co(segmentation=3), "bad", "coco"),  # was ignored silently
    ("segmentation_string", _co(segmentation="polygon"), "bad", "coco"),
    ("segmentation_null_polygon", _co(segmentation=[None]), "bad", "coco"),
    ("polygon_flat_numbers", _co(segmentation=[0, 0, 3, 0, 3, 2]), "bad", "coco"),
    ("polygon_dict", _co(segmentation=[{"x": 1}]), "bad", "coco"),  # was ignored silently
    ("polygon_strings", _co(segmentation=[["0", "a", "1", "2", "3", "4"]]), "bad", "coco"),
    ("polygon_odd_length", _co(segmentation=[[0, 0, 3, 0, 3, 2, 1]]), "bad", "coco"),
    ("rle_negative", _co(segmentation={"size": [3, 4], "counts": [4, -2, 10]}), "bad", "coco"),
    ("rle_sum_short", _co(segmentation={"size": [3, 4], "counts": [1, 2]}), "bad", "coco"),
    ("rle_sum_long", _co(segmentation={"size": [3, 4], "counts": [1, 2, 100]}), "bad", "coco"),
    ("rle_string_counts", _co(segmentation={"size": [3, 4], "counts": ["1", "2", "9"]}), "bad", "coco"),
    ("rle_float_counts", _co(segmentation={"size": [3, 4], "counts": [1.5, 2, 8.5]}), "bad", "coco"),
    ("rle_no_counts", _co(segmentation={"size": [3, 4]}), "bad", "coco"),
    ("rle_string_bad_char", _co(segmentation={"size": [3, 4], "counts": "~~"}), "bad", "coco"),
    ("rle_string_cut_in_a_count", _co(segmentation={"size": [3, 4], "counts": "1P"}), "bad", "coco"),
    ("rle_size_not_the_image", _co(segmentation={"size": [4, 3], "counts": [12]}), "bad", "coco"),
    ("polygon_coordinates_huge", _co(segmentation=[[1e308, 0, 3, -1e308, 2**64, 2]]), "either", "coco"),
    ("polygon_two_points", _co(segmentation=[[0, 0, 3, 2]]), "either", "coco"),
]


@pytest.mark.parametrize("doc,expect,fmt", [c[1:] for c in COCO_MINIMAL], ids=[c[0] for c in COCO_MINIMAL])
def test_coco_minimal(tmp_path, doc, expect, fmt):
    root = tmp_path / "coco"
    write(root / "images" / "a.png", encode(Image.new("L", (4, 3), 100), ".png"))
    write(root / "annotations.json", doc if isinstance(doc, bytes) else json.dumps(doc))
    case = Case(root, "coco")
    if expect == "bad":
        case.culprit("annotations.json", "a.png")
    elif expect == "either":
        case.maybe("a.png")
    check(case, fmt=fmt)


# ---------------------------------------------------------------------------------------------- RLE
@fuzz(150)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_rle_roundtrip(h, w, seed):
    m = (np.random.default_rng(seed).random((h, w)) > 0.5).astype(np.uint8)
    counts = rle_counts(m)
    np.testing.assert_array_equal(rle_decode({"size": [h, w], "counts": counts}, h, w), m)
    np.testing.assert_array_equal(rle_decode({"size": [h, w], "counts": rle_string(counts)}, h, w), m)


@fuzz(150)
@given(st.integers(1, 6), st.integers(1, 6), st.one_of(
    st.lists(st.integers(-50, 50), max_size=6), st.text(max_size=8),
    st.lists(st.one_of(st.none(), st.floats(), st.text(max_size=2), st.booleans()), min_size=1, max_size=4),
    st.none(), st.integers(), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)),
    st.one_of(st.none(), st.lists(st.integers(0, 7), max_size=3)))
def test_rle_decode_bad_counts_raise_value_error(h, w, counts, size):
    """Any RLE is decoded to an (h, w) 0/1 mask whose runs sum to h*w, or refused with ValueError (no other type)."""
    rle = {"counts": counts} if size is None else {"counts": counts, "size": size}
    try:
        m = rle_decode(rle, h, w)
    except ValueError:
        return
    assert m.shape == (h, w) and set(np.unique(m).tolist()) <= {0, 1}
    if isinstance(counts, list):
        assert all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) \
               and sum(counts) == h * w, counts
    if size is not None:
        assert list(size) == [h, w]

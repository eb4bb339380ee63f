"""One reader, one gate (issue 33): a catalogue of bad real-data folders, each read by every path that reads users'
real data -- ``finetune``, ``doctor`` and generate's ``copypaste.data``, ``defects.fit`` and
``procedural.backgrounds``. Doctor exits 1 exactly when finetune refuses the folder, both naming the culprit; each
generate reader works, or stops with one error naming the culprit, no traceback and nothing written.

Finetune runs in-process up to the model build, which is replaced by a sentinel error: every data check comes before
it, so reaching it means the data was accepted (and no model is built)."""
from __future__ import annotations

import base64
import io
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from conftest import assert_cli_error
from synthvit.data import set_pixel_cap
from synthvit.io import SynthvitError

SIDE, N, TRAIN = 48, 12, 8  # frames of SIDE px; ids im00..im11, the first TRAIN in train (splits.csv)
FT = ["model=vit_tiny_patch16_224", "crop_size=32", "batch_size=2", "num_workers=0", "steps=1", "evaluate=false",
      "defect_crop_prob=0.8"]
GEN = ["image_size=32", "num_samples=2", "samples_per_shard=2", "num_workers=0", "preview=0"]
READERS = {"copypaste": ["backend=copypaste", "copypaste.data={}"], "fit": ["defects.fit={}"],
           "backgrounds": ["procedural.backgrounds={}"]}
REACHED = "the data passed: the model build was reached"
ALL, NONE = frozenset(READERS), frozenset()


# ---------------------------------------------------------------------------------------------- the folders
def spots(i: int) -> list[tuple[int, int]]:
    """The top-left corners of frame ``i``'s two 6 x 6 defects (odd frames; none in even ones), one per half."""
    rng = np.random.default_rng([i, 1])
    return [(int(rng.integers(2, 14)), int(rng.integers(2, 40))), (int(rng.integers(26, 40)),
                                                                     int(rng.integers(2, 40)))] if i % 2 else []


def frame(i: int, size: int = SIDE) -> tuple[np.ndarray, np.ndarray]:
    """Frame ``i``: grey noise (100..140), odd ones with two dark (30) 6 x 6 defects, and its 0/255 mask."""
    rng = np.random.default_rng(i)
    img, mask = (rng.random((size, size)) * 40 + 100).astype(np.uint8), np.zeros((size, size), np.uint8)
    if i % 2:
        for y, x in spots(i):
            mask[y:y + 6, x:x + 6] = 255
        img[mask > 0] = 30
    return img, mask


def splits_csv(ids, train=TRAIN) -> str:
    return "id,split\n" + "".join(f"{i},{'train' if k < train else 'test'}\n" for k, i in enumerate(ids))


def canonical(root: Path) -> Path:
    """The good folder: images/, masks/ (0/255), labels.csv (good/dark) and splits.csv."""
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    ids = [f"im{i:02d}" for i in range(N)]
    for i, name in enumerate(ids):
        img, mask = frame(i)
        Image.fromarray(img).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    (root / "labels.csv").write_text("id,label\n" + "".join(f"{n},{'dark' if i % 2 else 'good'}\n"
                                                           for i, n in enumerate(ids)))
    (root / "splits.csv").write_text(splits_csv(ids))
    return root


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG")
    return buf.getvalue()


def coco(root: Path, empty_segmentation: bool) -> Path:
    """A COCO folder of the same frames, polygons on the defects; one annotation ``"segmentation": []``."""
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(N):
        (root / "images" / f"im{i:02d}.png").write_bytes(png(frame(i)[0]))
        images.append({"id": i + 1, "file_name": f"im{i:02d}.png", "width": SIDE, "height": SIDE})
        for y, x in spots(i):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "bbox": [x, y, 6, 6],
                                "segmentation": [[x, y, x + 6, y, x + 6, y + 6, x, y + 6]], "area": 36})
    if empty_segmentation:
        annotations[2]["segmentation"] = []
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                       "categories": [{"id": 1, "name": "dark"}]}))
    (root / "splits.csv").write_text(splits_csv(f"im{i:02d}" for i in range(N)))
    return root


def labelme(root: Path, bad: str) -> Path:
    """A labelme folder, each frame embedded (imageData) in its JSON; ``bad``'s imageData is not an image."""
    root.mkdir(parents=True)
    for i in range(N):
        shapes = [{"label": "dark", "shape_type": "rectangle", "points": [[x, y], [x + 5, y + 5]]}
                  for y, x in spots(i)]
        data = b"not a png at all" if f"im{i:02d}" == bad else png(frame(i)[0])
        (root / f"im{i:02d}.json").write_text(json.dumps({"shapes": shapes, "imagePath": f"im{i:02d}.png",
                                                          "imageData": base64.b64encode(data).decode()}))
    (root / "splits.csv").write_text(splits_csv(f"im{i:02d}" for i in range(N)))
    return root


def rgba(root: Path) -> None:
    img = np.dstack([frame(2)[0]] * 3 + [np.full((SIDE, SIDE), 128, np.uint8)])
    Image.fromarray(img, "RGBA").save(root / "images/im02.png")


def bigger_frame(root: Path) -> None:
    img, mask = frame(3, 64)  # 4096 px, over max_pixels=4000; the others have 2304
    Image.fromarray(img).save(root / "images/im03.png")
    Image.fromarray(mask).save(root / "masks/im03.png")


def no_splits_no_labels(root: Path) -> None:
    """The seeded split, stratified by defect presence: it reads every mask (and its image's size)."""
    (root / "splits.csv").unlink()
    (root / "labels.csv").unlink()


def dangling(root: Path) -> None:
    (root / "images/im12.png").symlink_to(root / "gone.png")
    with open(root / "splits.csv", "a") as f:
        f.write("im12,train\n")
    with open(root / "labels.csv", "a") as f:
        f.write("im12,good\n")


def sixteen_bit_mask(root: Path) -> None:
    m = np.zeros((SIDE, SIDE), np.uint16)
    m[8:14, 8:14] = 300
    Image.fromarray(m).save(root / "masks/im03.png")


def class_ids(root: Path, bad: int | None) -> None:
    """classes.txt and masks of class ids (0/1); im03's holds ``bad`` too."""
    (root / "classes.txt").write_text("background\ndefect\n")
    for p in (root / "masks").iterdir():
        m = (np.asarray(Image.open(p)) > 0).astype(np.uint8)
        if p.stem == "im03" and bad is not None:
            m[0, 0] = bad
        Image.fromarray(m).save(p)


def write(rel: str, data: bytes | Callable[[Path], bytes]) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        (root / rel).write_bytes(data(root) if callable(data) else data)
    return edit


def truncated(rel: str) -> Callable[[Path], None]:
    return write(rel, lambda root: (root / rel).read_bytes()[:300])


def append(rel: str, text: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        with open(root / rel, "a") as f:
            f.write(text)
    return edit


def remove(rel: str) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = root / rel
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return edit


@dataclass(frozen=True)
class Bad:
    name: str
    edit: Callable[[Path], None] | None  # applied to a copy of the good canonical folder
    culprit: str  # what every error names ("{root}": the data folder)
    refused: bool  # finetune (and so doctor) refuses it
    readers_refuse: frozenset = ALL  # the generate readers that refuse it; the others work
    keys: tuple = ()  # finetune/doctor keys
    make: Callable[[Path], Path] | None = None  # builds a folder of another layout instead


CATALOGUE = [
    Bad("good folder", None, "", False, NONE),
    Bad("0-byte train image", write("images/im03.png", b""), "im03.png", True),
    Bad("truncated train image", truncated("images/im03.png"), "im03.png", True),
    Bad("text file named .png", write("images/im03.png", b"hello, not a png"), "im03.png", True),
    Bad("truncated test image (never opened by generate)", truncated("images/im09.png"), "im09.png", True, NONE),
    Bad("0-byte image, seeded split", lambda r: (no_splits_no_labels(r), write("images/im03.png", b"")(r)),
        "im03.png", True),
    Bad("dangling symlink", dangling, "im12.png", True),
    Bad("mask of the wrong size", write("masks/im03.png", png(np.zeros((10, 10), np.uint8))), "im03.png", True),
    Bad("binary mask with another value", write("masks/im03.png", png(np.where(frame(3)[1] > 0, 255, 7).astype(
        np.uint8))), "im03.png", True),
    Bad("mask value outside classes.txt", lambda r: class_ids(r, 3), "im03.png", True),
    Bad("0-byte mask", write("masks/im03.png", b""), "im03.png", True),
    Bad("colour-coded mask", write("masks/im03.png", png(np.dstack([frame(3)[1], frame(3)[1] * 0,
                                                                   frame(3)[1] * 0]))), "im03.png", True),
    Bad("16-bit mask over 255", sixteen_bit_mask, "im03.png", True),
    Bad("JPEG mask", lambda r: (r / "masks/im03.png").rename(r / "masks/im03.jpg"), "im03.jpg", True),
    Bad("mask without an image", write("masks/im99.png", png(np.zeros((SIDE, SIDE), np.uint8))), "im99", True),
    Bad("two images with one id", write("images/im03.jpg", lambda r: (r / "images/im03.png").read_bytes()),
        "im03.jpg", True),
    Bad("labels.csv names a missing file", append("labels.csv", "im99,dark\n"), "im99", True),
    Bad("splits.csv with a split 'val'", append("splits.csv", "im99,val\n"), "splits.csv", True),
    Bad("every image in the test split", write("splits.csv", lambda r: splits_csv(
        [f"im{i:02d}" for i in range(N)], 0).encode()), "{root}", True),
    Bad("images without masks, task=seg", remove("masks"), "{root}", True, frozenset({"copypaste", "fit"})),
    Bad("no labels, task=cls", remove("labels.csv"), "{root}", True, NONE, ("task=cls",)),
    Bad("RGBA frame with alpha < 255 (read blended, warned)", rgba, "", False, NONE),
    Bad("a macOS ._ fork beside the images (not data)", write("images/._im00.png", b"\0\5\26\7"), "", False, NONE),
    Bad("a frame over max_pixels", bigger_frame, "im03.png", True, NONE, ("max_pixels=4000",)),
    Bad("COCO with an empty segmentation", None, "annotations.json", True, frozenset({"copypaste", "fit"}),
        make=lambda root: coco(root, True)),
    Bad("labelme imageData that is no image", None, "im03.json#imageData", True,
        make=lambda root: labelme(root, "im03")),
]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return canonical(tmp_path_factory.mktemp("good") / "data")


@pytest.fixture
def finetune_stops_at_the_model(monkeypatch):
    """finetune up to its model build: every check of the data comes before it."""
    import finetune.run

    def reached(*_):
        raise SynthvitError(REACHED)

    monkeypatch.setattr(finetune.run, "_build", reached)


@pytest.fixture(autouse=True)
def default_pixel_cap():
    yield
    set_pixel_cap()  # a case's max_pixels must not stay set for the next


def build(bad: Bad, good: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    if bad.make is not None:
        return bad.make(root)
    shutil.copytree(good, root, symlinks=True)
    if bad.edit is not None:
        bad.edit(root)
    return root


@pytest.mark.parametrize("bad", CATALOGUE, ids=[b.name for b in CATALOGUE])
def test_doctor_agrees_with_finetune_and_generate_names_the_culprit(bad, good, tmp_path, cli,
                                                                     finetune_stops_at_the_model, one_torch_thread):
    root = build(bad, good, tmp_path)
    culprit = bad.culprit.format(root=root)
    ft = cli("finetune", f"data={root}", f"out_dir={tmp_path / 'run'}", *FT, *bad.keys)
    assert_cli_error(ft, 1, *([culprit] if bad.refused else [REACHED]))
    assert (REACHED not in ft.stderr) == bad.refused
    assert not (tmp_path / "run" / "export").exists()
    doc = cli("doctor", f"data={root}", f"report_dir={tmp_path / 'doctor'}", *FT, *bad.keys)
    if bad.refused:
        assert_cli_error(doc, 1)
        assert culprit in doc.stdout + doc.stderr  # in its error, or in a PROBLEM line of its table
    else:
        assert doc.returncode == 0 and "verdict   fit" in doc.stdout, doc.stdout[-2000:] + doc.stderr[-2000:]
    for reader, keys in READERS.items():
        out = tmp_path / f"gen-{reader}"
        res = cli("generate", *[k.format(root) for k in keys], *GEN, f"out_dir={out}")
        if reader in bad.readers_refuse:
            assert_cli_error(res, 1, culprit)
            assert not [p for p in out.rglob("*") if p.is_file()] if out.exists() else True, reader
        else:
            assert res.returncode == 0, f"{reader}: {res.stderr[-2000:]}"
            assert len(list(out.glob("*.tar"))) == 1 and (out / "_info.json").is_file()
        assert "BytesIO" not in res.stderr
    assert "BytesIO" not in ft.stderr + doc.stdout + doc.stderr


def test_a_frame_with_transparency_is_named_in_a_warning(good, tmp_path, cli, finetune_stops_at_the_model, caplog):
    root = build(CATALOGUE[[b.name for b in CATALOGUE].index("RGBA frame with alpha < 255 (read blended, warned)")],
                 good, tmp_path)
    cli("finetune", f"data={root}", f"out_dir={tmp_path / 'run'}", *FT)
    warned = [r.getMessage() for r in caplog.records if "transparent" in r.getMessage()]
    assert len(warned) == 1 and "im02.png" in warned[0] and "blended onto black" in warned[0]


def test_max_pixels_is_the_cut_off_and_pillow_never_warns(good, tmp_path, cli, finetune_stops_at_the_model):
    root = build(CATALOGUE[[b.name for b in CATALOGUE].index("a frame over max_pixels")], good, tmp_path)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        # 4096 px: refused at 4095 (Pillow alone refuses only over twice its cap), accepted at 4096, and never a
        # DecompressionBombWarning (Pillow warns over its cap, which is half max_pixels)
        refused = cli("finetune", f"data={root}", f"out_dir={tmp_path / 'a'}", *FT, "max_pixels=4095")
        accepted = cli("finetune", f"data={root}", f"out_dir={tmp_path / 'b'}", *FT, "max_pixels=4096")
    assert_cli_error(refused, 1, "im03.png: unreadable image (4096 pixels, more than the max_pixels cap of 4095)")
    assert REACHED in accepted.stderr
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_plain_backgrounds_folder_lists_every_unreadable_file(tmp_path, cli):
    """procedural.backgrounds on a plain folder: a link to nowhere and an empty file are named in one error (a link
    was skipped unlisted before), nothing is written."""
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(2):
        Image.fromarray(frame(2 * i)[0]).save(plain / f"bg{i}.png")
    (plain / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (plain / "empty.png").write_bytes(b"")
    out = tmp_path / "out"
    res = cli("generate", f"procedural.backgrounds={plain}", *GEN, f"out_dir={out}")
    assert_cli_error(res, 1, "2 unreadable image(s)", "gone.png: unreadable image (a symbolic link to",
                     "empty.png: unreadable image (cannot identify image", "empty (0 bytes)")
    assert not list(out.glob("*.tar")) and not (out / "_info.json").exists()

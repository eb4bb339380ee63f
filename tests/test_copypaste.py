"""backend=copypaste: the labelled defects of a real-data folder's train split pasted into its defect-free train
frames. Exact masks with the real classes, the same bytes for any worker count, never a test image, one clear error
for unusable input before any shard, and each defect's surroundings matched to the spot it lands on."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from conftest import assert_cli_error
from generate.backends import Backend, BaseBackend, create_backend
from generate.config import GenerateConfig
from generate.run import run
from generate.schema import INFO_FILE, iter_shard
from synthvit.config import ConfigError, load_config

CLASSES = ["background", "scratch", "spot"]
SHADE = {1: 10, 2: 240}  # the grey of each class's defect pixels; frames are 100..140


def write_real(root: Path, frames: dict, classes=None, splits: dict | None = None) -> Path:
    """A canonical real-data folder: ``frames`` id -> (image, mask) uint8 arrays; ``splits`` id -> train|test."""
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i, (img, mask) in frames.items():
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    if splits:
        (root / "splits.csv").write_text("id,split\n" + "".join(f"{i},{s}\n" for i, s in splits.items()))
    return root


def surface(rng, size=(64, 64), level=100, spread=40) -> np.ndarray:
    return (rng.random(size) * spread + level).astype(np.uint8)


def two_class_frames(n_good=3, n_bad=3, size=(64, 64)) -> dict:
    """Defect-free frames and defective ones, each holding a scratch (class 1, grey 10) and, 3 px from it (inside
    its margin), a spot (class 2, grey 240) -- plus a 2 px speck, under min_area."""
    rng = np.random.default_rng(0)
    frames = {}
    for k in range(n_good):
        frames[f"good{k}"] = surface(rng, size), np.zeros(size, np.uint8)
    for k in range(n_bad):
        img, mask = surface(rng, size), np.zeros(size, np.uint8)
        y, x = 10 + 4 * k, 12 + 3 * k
        mask[y:y + 3, x:x + 14 + k] = 1  # a scratch, 3 x (14 + k)
        mask[y + 5:y + 10, x + 2:x + 7 + k] = 2  # a spot 3 px below it: inside the scratch's margin
        mask[50, 50:52] = 1  # a speck: dropped
        for c, grey in SHADE.items():
            img[mask == c] = grey
        frames[f"bad{k}"] = img, mask
    return frames


def config(data: Path, *overrides: str, out: Path | None = None) -> GenerateConfig:
    base = ["backend=copypaste", f"copypaste.data={data}", "image_size=48", "num_samples=24", "samples_per_shard=8",
            "num_workers=0", "preview=0", "image_format=png", *([f"out_dir={out}"] if out else [])]
    return load_config(GenerateConfig, overrides=[*base, *overrides])


def samples(out: Path) -> list:
    return [s for f in sorted(out.glob("*.tar")) for s in iter_shard(f)]


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    frames = two_class_frames()
    return write_real(tmp_path_factory.mktemp("real"), frames, CLASSES, {i: "train" for i in frames})


def test_pasted_masks_are_exact_with_the_real_classes(real, tmp_path):
    cfg = config(real, "copypaste.scale=1", "copypaste.elastic=0", "copypaste.match=false",
                 "copypaste.max_instances=4", out=tmp_path / "out")
    backend = create_backend("copypaste", cfg)
    assert isinstance(backend, Backend) and isinstance(backend, BaseBackend)
    assert backend.class_names == ["good", "scratch", "spot"]  # id 0 is the shard contract's defect-free class
    # one patch per component of at least min_area px, with exactly the component's pixels
    areas = {}
    for i in range(3):
        mask = np.asarray(Image.open(real / "masks" / f"bad{i}.png"))
        for c in (1, 2):
            lab, n = ndimage.label(mask == c, structure=np.ones((3, 3)))
            areas[(f"bad{i}", c)] = sorted(int((lab == j).sum()) for j in range(1, n + 1) if (lab == j).sum() >= 4)
    patches = {p.id: p for p in backend.patches}
    assert {(p.image, p.cls): [int(p.own.sum())] for p in backend.patches} == areas
    run(cfg)
    info = json.loads((tmp_path / "out" / INFO_FILE).read_text())
    assert info["class_names"] == ["good", "scratch", "spot"] and info["copypaste"]["classes"] == CLASSES
    assert info["copypaste"]["instances"]["dropped_small"] == 3
    pasted_any = 0
    for s in samples(tmp_path / "out"):
        pasted = s.meta["pasted"]
        assert s.meta["sources"] == [p["source"] for p in pasted]
        for p in pasted:  # turned and flipped only: every pasted instance has its source's pixel count
            assert p["area"] == int(patches[p["source"]].own.sum()) and p["class"] == patches[p["source"]].cls
            assert p["name"] == backend.class_names[p["class"]] and p["image"] == patches[p["source"]].image
        pasted_any += len(pasted)
        assert int((s.mask > 0).sum()) == sum(p["area"] for p in pasted) + s.meta["existing_pixels"]
        assert sum(d["area"] for d in s.meta["defects"]) == int((s.mask > 0).sum())
        for c, grey in SHADE.items():  # every pixel of class c is a pixel of a class-c defect, and vice versa
            assert (s.image[s.mask == c] == grey).all()
            assert ((s.image == grey) == (s.mask == c)).all()  # no unlabelled defect pixel (margins hold none)
        assert ((s.image >= 100) & (s.image < 140))[s.mask == 0].all()  # nor any trace of one (margins hold none)
        counts = np.bincount(s.mask.ravel(), minlength=3)[1:]
        assert s.cls == (int(counts.argmax()) + 1 if counts.any() else 0)
    assert pasted_any >= 24


def test_default_transforms_keep_masks_exact(real):
    backend = create_backend("copypaste", config(real))
    for i in range(20):
        s = backend.render(i)
        assert set(np.unique(s.mask).tolist()) <= {0, 1, 2}
        assert int((s.mask > 0).sum()) == sum(p["area"] for p in s.meta["pasted"]) + s.meta["existing_pixels"]
        assert all(0.75 <= p["scale"] <= 1.33 and p["rotation"] in (0, 90, 180, 270) for p in s.meta["pasted"])


def test_identical_bytes_for_any_worker_count(real, tmp_path):
    run(config(real, out=tmp_path / "w0"))
    run(config(real, "num_workers=2", out=tmp_path / "w2"))
    tars = sorted(p.name for p in (tmp_path / "w0").glob("*.tar"))
    assert len(tars) == 3
    for name in [*tars, INFO_FILE]:
        assert (tmp_path / "w0" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


def test_test_images_are_never_drawn(tmp_path):
    frames = two_class_frames(n_good=4, n_bad=4)
    test_ids = {"good0", "good3", "bad1", "bad2"}
    root = write_real(tmp_path / "real", frames, CLASSES, {i: "test" if i in test_ids else "train" for i in frames})
    out = tmp_path / "out"
    run(config(root, "num_samples=40", out=out))
    train = set(frames) - test_ids
    record = json.loads((out / INFO_FILE).read_text())["copypaste"]
    assert record["split"] == {"source": "splits.csv", "train": 4, "test": 4, "train_defective": 2,
                               "train_defect_free": 2, "train_unused": 0}
    assert record["backgrounds"] == ["good1", "good2"] and record["free_area_frames"] == ["bad0", "bad3"]
    assert record["defect_sources"] == ["bad0", "bad3"] and record["real_ids"] == sorted(train)
    used_frames, used_sources = set(), set()
    for s in samples(out):
        used_frames.add(s.meta["background"]["id"])
        used_sources |= {p.rsplit("#", 1)[0] for p in s.meta["sources"]}
    assert used_frames == train and used_sources == {"bad0", "bad3"}


def test_bad_input_is_one_error_before_any_shard(tmp_path, cli):
    frames = two_class_frames()
    cases = {
        "no-defect-in-train": ({i: "test" if i.startswith("bad") else "train" for i in frames},
                               ["has no labelled defect in its train split", "train: 3 images, 0 with a defect",
                                "test: 3 images, 3 with a defect"]),
        "all-test": ({i: "test" for i in frames}, ["has no train image: all 6 images are in the test split"]),
    }
    for name, (splits, messages) in cases.items():
        root = write_real(tmp_path / name, frames, CLASSES, splits)
        out = tmp_path / f"out-{name}"
        res = cli("generate", "backend=copypaste", f"copypaste.data={root}", f"out_dir={out}", "num_samples=4",
                  "image_size=48", "num_workers=0")
        assert_cli_error(res, 1, f"copypaste.data: {root}", *messages)
        assert not out.exists() or not list(out.glob("*.tar"))
    # only defective frames and free_areas=false: nothing to paste into
    bad_only = write_real(tmp_path / "bad-only", {i: v for i, v in frames.items() if i.startswith("bad")}, CLASSES,
                          {f"bad{k}": "train" for k in range(3)})
    res = cli("generate", "backend=copypaste", f"copypaste.data={bad_only}", "copypaste.free_areas=false",
              f"out_dir={tmp_path / 'out-bad-only'}", "num_samples=4", "image_size=48", "num_workers=0")
    assert_cli_error(res, 1, "has no defect-free image in its train split", "copypaste.free_areas=true")
    res = cli("generate", "backend=copypaste", f"out_dir={tmp_path / 'out-none'}")
    assert_cli_error(res, 2, "copypaste.data: backend=copypaste needs copypaste.data=FOLDER")
    assert not (tmp_path / "out-none").exists()


@pytest.mark.parametrize("override, message", [
    ("copypaste.feather=5", "feather: 5.0 not accepted"), ("copypaste.scale=[2, 1]", "scale: [2.0, 1.0]"),
    ("copypaste.max_instances=0", "max_instances: 0"), ("copypaste.format=imagefolder", "format: 'imagefolder'"),
    ("copypaste.orientation=diagonal", "'diagonal' is not accepted; choose one of 'right' | 'any' | 'real'"),
    ("copypaste.blend=seamless", "'seamless' is not accepted; choose one of 'alpha' | 'poisson'"),
])
def test_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(GenerateConfig, overrides=["backend=copypaste", "copypaste.data=x", override])


def test_brightness_and_contrast_follow_the_destination(tmp_path):
    """A dark defect cut from a bright frame lands in dark frames: its surroundings take the dark frame's level,
    and the defect stays darker than them."""
    rng = np.random.default_rng(1)
    frames = {}
    for k in range(3):
        frames[f"dark{k}"] = surface(rng, level=40, spread=20), np.zeros((64, 64), np.uint8)
        img, mask = surface(rng, level=190, spread=20), np.zeros((64, 64), np.uint8)
        mask[20:28, 18:34] = 255
        img[mask > 0] = 120  # darker than its bright surroundings (by ~80), brighter than a dark frame
        frames[f"bright{k}"] = img, mask
    root = write_real(tmp_path / "real", frames, splits={i: "train" for i in frames})
    for match in ("true", "false"):
        backend = create_backend("copypaste", config(root, "copypaste.free_areas=false", "copypaste.max_instances=1",
                                                     "copypaste.elastic=0", "copypaste.scale=1",
                                                     f"copypaste.match={match}"))
        for i in range(6):
            s = backend.render(i)
            own = s.mask > 0
            near = ndimage.binary_dilation(own, iterations=2) & ~own  # the margin, blended at alpha ~1
            far = ~ndimage.binary_dilation(own, iterations=8)
            img = s.image.astype(float)
            assert 40 <= img[far].mean() <= 60  # a dark frame
            if match == "true":
                assert abs(img[near].mean() - img[far].mean()) < 8
                assert img[own].mean() < img[near].mean() - 30
            else:  # pasted as it was: its bright surroundings come along
                assert img[near].mean() > 150


def test_context_placement_lands_defects_where_their_surroundings_match(tmp_path):
    """Frames half dark, half bright; every defect is cut from the bright half. placement=context puts nearly every
    pasted defect on the bright half (its margin ring looks like the ring it was cut with); uniform about half."""
    rng = np.random.default_rng(2)
    frames = {}
    for k in range(4):
        img, mask = surface(rng, level=30, spread=10), np.zeros((64, 64), np.uint8)
        img[:, 32:] = surface(rng, (64, 32), level=200, spread=10)
        frames[f"good{k}"] = img, np.zeros((64, 64), np.uint8)
        bad = img.copy()
        mask[20 + k:24 + k, 40:46] = 255
        bad[mask > 0] = 110
        frames[f"bad{k}"] = bad, mask
    root = write_real(tmp_path / "real", frames, splits={i: "train" for i in frames})
    share = {}
    for placement in ("uniform", "context"):
        backend = create_backend("copypaste", config(root, "copypaste.free_areas=false", "copypaste.max_instances=1",
                                                     "copypaste.elastic=0", "copypaste.scale=1", "image_size=64",
                                                     "copypaste.match=false", "copypaste.rotate=false",
                                                     f"copypaste.placement={placement}"))
        bright = total = 0
        for i in range(40):
            s = backend.render(i)
            for d in s.meta["pasted"]:
                x = d["at"][0] + d["size"][0] / 2  # the patch's centre column
                bright += x >= 32
                total += 1
        share[placement] = bright / total
    assert share["context"] >= 0.9 and share["uniform"] <= 0.75, share


def line_frames(tmp_path: Path, n=4, size=64) -> Path:
    """Defect-free frames and defective ones, each with a horizontal line defect (class 1, 2 x 16 px) in its
    top-left quarter."""
    rng = np.random.default_rng(3)
    frames = {}
    for k in range(n):
        frames[f"good{k}"] = surface(rng, (size, size)), np.zeros((size, size), np.uint8)
        img, mask = surface(rng, (size, size)), np.zeros((size, size), np.uint8)
        mask[8 + k:10 + k, 4 + k:20 + k] = 1
        img[mask > 0] = 10
        frames[f"bad{k}"] = img, mask
    return write_real(tmp_path / "real", frames, ["background", "scratch"], {i: "train" for i in frames})


def pasted_angles(backend, n=30):
    """The principal-axis angle (degrees, [0, 180)) of every pasted instance of the first ``n`` samples."""
    from generate.backends.copypaste import principal_angle
    angles = []
    for i in range(n):
        s = backend.render(i)
        lab, k = ndimage.label(s.mask > 0, structure=np.ones((3, 3)))
        angles += [principal_angle(lab == j) for j in range(1, k + 1)]
    return np.array(angles)


def test_orientation_real_lays_defects_as_the_real_ones_lie(tmp_path):
    """Every real defect is a horizontal line: orientation=real keeps every pasted one horizontal (turned by 0 or
    180 degrees, flipped along its axis), right turns about half upright, any lays them at all angles."""
    root = line_frames(tmp_path)
    base = ("copypaste.free_areas=false", "copypaste.max_instances=2", "copypaste.elastic=0", "copypaste.scale=1",
            "image_size=64", "copypaste.match=false")
    off = {}
    for orientation in ("real", "right", "any"):
        backend = create_backend("copypaste", config(root, *base, f"copypaste.orientation={orientation}"))
        angles = pasted_angles(backend)
        assert len(angles) >= 30
        off[orientation] = np.minimum(angles, 180 - angles)  # degrees off horizontal
        if orientation != "right":  # turned by any angle: the mask follows the pixels, its area about kept
            for i in range(10):
                s = backend.render(i)
                assert ((s.image < 60) == (s.mask > 0)).mean() > 0.99
                assert all(abs(p["area"] - 32) <= 10 for p in s.meta["pasted"])
                assert s.meta["pasted"] == backend.render(i).meta["pasted"]  # drawn from (seed, index) alone
    assert (off["real"] <= 5).all(), off["real"]
    assert 0.3 <= (off["right"] > 80).mean() <= 0.7 and ((off["right"] <= 5) | (off["right"] > 80)).all()
    assert ((off["any"] > 10) & (off["any"] < 80)).mean() >= 0.4, off["any"]


def test_placement_real_lands_defects_where_the_real_ones_sit(tmp_path):
    """Every real defect sits in its frame's top-left quarter: placement=real lands nearly every pasted one there
    (whole frames, no crop), uniform about a quarter of them."""
    root = line_frames(tmp_path)
    share = {}
    for placement in ("real", "uniform"):
        backend = create_backend("copypaste", config(root, "copypaste.free_areas=false", "copypaste.max_instances=1",
                                                     "copypaste.elastic=0", "copypaste.scale=1", "image_size=64",
                                                     "copypaste.rotate=false", f"copypaste.placement={placement}"))
        centres = []
        for i in range(40):
            s = backend.render(i)
            ys, xs = np.nonzero(s.mask)
            centres.append((ys.mean(), xs.mean()))
            if placement == "real":
                assert {p["placed"] for p in s.meta["pasted"]} <= {"real", "uniform"}
        centres = np.array(centres)
        share[placement] = ((centres[:, 0] < 24) & (centres[:, 1] < 32)).mean()
    assert share["real"] >= 0.9 and share["uniform"] <= 0.5, share


def test_poisson_blend_meets_the_destination_and_keeps_the_defect(tmp_path):
    """A darker defect cut from a bright frame, pasted as it is (match=false) into dim frames: alpha blending brings
    its bright surroundings along; poisson cloning makes them meet the dim frame while the defect keeps its step
    below them."""
    rng = np.random.default_rng(1)
    frames = {}
    for k in range(3):
        frames[f"dim{k}"] = surface(rng, level=90, spread=20), np.zeros((64, 64), np.uint8)
        img, mask = surface(rng, level=190, spread=20), np.zeros((64, 64), np.uint8)
        mask[20:28, 18:34] = 255
        img[mask > 0] = 120
        frames[f"bright{k}"] = img, mask
    root = write_real(tmp_path / "real", frames, splits={i: "train" for i in frames})
    for blend in ("alpha", "poisson"):
        backend = create_backend("copypaste", config(root, "copypaste.free_areas=false", "copypaste.max_instances=1",
                                                     "copypaste.elastic=0", "copypaste.scale=1", "copypaste.margin=6",
                                                     "copypaste.feather=3", "copypaste.match=false",
                                                     f"copypaste.blend={blend}"))
        for i in range(4):
            s = backend.render(i)
            own = s.mask > 0
            ring = ndimage.binary_dilation(own, iterations=2) & ~own
            far = ~ndimage.binary_dilation(own, iterations=10)
            img = s.image.astype(float)
            if blend == "alpha":
                assert img[ring].mean() > 150
            else:
                assert abs(img[ring].mean() - img[far].mean()) < 15, (img[ring].mean(), img[far].mean())
                assert img[own].mean() < img[ring].mean() - 50  # the real step: 70

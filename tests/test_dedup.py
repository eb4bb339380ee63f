"""Near-duplicates across the split (synthvit/data/dedup.py): the perceptual hash against imagehash's algorithm,
crafted copies (resized, re-encoded as JPEG, shifted, cropped) found and different textures left alone, the pair
finder's distances, order and threshold, finetune's warning and near_duplicates.json, and compare's report line."""
import io
import json
import time

import numpy as np
import pytest
from PIL import Image

from synthvit.data import load_real_data, near_duplicates, split_ids
from synthvit.data.dedup import MAX_DISTANCE, NearDuplicate, cross_split_pairs, hamming, hash_items, pairs_text, phash

H, W = 96, 128  # frames; each is cut from a texture PAD px larger on every side, so a shifted copy has real content
PAD = 4


def texture(seed: int) -> np.ndarray:
    """A (H + 2 PAD, W + 2 PAD) uint8 texture with a natural-image spectrum (power ~ 1/f^3), a different one per
    seed."""
    rng = np.random.default_rng(seed)
    size = (H + 2 * PAD, W + 2 * PAD)
    f = np.hypot(np.fft.fftfreq(size[0])[:, None], np.fft.rfftfreq(size[1])[None])
    f[0, 0] = 1
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** 1.5
    a = np.fft.irfft2(spectrum, s=size)
    return ((a - a.min()) / (a.max() - a.min()) * 220 + 15).astype(np.uint8)


def frame(seed: int, dy: int = 0, dx: int = 0) -> np.ndarray:
    """The (H, W) frame of ``texture(seed)``, its window moved by (dy, dx) px."""
    return texture(seed)[PAD + dy:PAD + dy + H, PAD + dx:PAD + dx + W]


def jpeg(a: np.ndarray, quality: int = 60) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def copies(seed: int) -> dict[str, Image.Image]:
    """Crafted near-duplicates of ``frame(seed)``."""
    a = frame(seed)
    return {"resized up": Image.fromarray(a).resize((2 * W, 2 * H), Image.Resampling.BICUBIC),
            "resized down": Image.fromarray(a).resize((W // 2, H // 2), Image.Resampling.BILINEAR),
            "jpeg q60": Image.open(io.BytesIO(jpeg(a))),
            "rgb": Image.fromarray(np.dstack([a, a, a])),
            "shifted 1 px": Image.fromarray(frame(seed, 1, 1)),
            "cropped 1-2 px a side": Image.fromarray(a[1:-1, 2:-2])}


def bits(x: int) -> int:
    return bin(x).count("1")


def reference_phash(image: Image.Image) -> int:
    """imagehash.phash(image) (hash_size 8), as imagehash 4.3 computes it, with the bits read as one integer."""
    from scipy.fftpack import dct

    pixels = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS))
    low = dct(dct(pixels, axis=0), axis=1)[:8, :8]
    return int("".join("1" if b else "0" for b in (low > np.median(low)).flatten()), 2)


# ---------------------------------------------------------------------------------------------- the hash
def test_phash_is_imagehash_phash_of_small_frames():
    for seed in range(4):
        a = frame(seed)
        h = phash(a)
        assert h == reference_phash(Image.fromarray(a)), seed
        assert h == phash(Image.fromarray(a)) and 0 <= h < 2 ** 64
        assert h >> 63 == 1  # the DC term's bit: set for any frame that is not black
    assert phash(np.zeros((H, W), np.uint8)) == 0


def test_crafted_copies_are_within_the_threshold_and_different_textures_far_beyond():
    seeds = range(4)
    hashes = {s: phash(frame(s)) for s in seeds}
    for s in seeds:
        distances = {name: bits(hashes[s] ^ phash(im)) for name, im in copies(s).items()}
        assert max(distances.values()) <= MAX_DISTANCE, (s, distances)
        for name in ("resized up", "resized down", "jpeg q60", "rgb"):  # the whole frame, re-sampled: nearly exact
            assert distances[name] <= 2, (s, name, distances)
        assert bits(hashes[s] ^ phash(frame(s, 8, 8))) > MAX_DISTANCE  # a shift of 6 % of the frame is not a copy
    different = [bits(hashes[a] ^ hashes[b]) for a in seeds for b in seeds if a < b]
    different += [bits(phash(frame(s)) ^ phash(frame(100 + s))) for s in range(20)]
    assert min(different) > 3 * MAX_DISTANCE, different  # independent textures: about half of the 64 bits


def test_hamming_counts_every_bit_of_64_bit_hashes():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2 ** 63, 50, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 50, dtype=np.uint64)
    b = np.concatenate([a[:5] ^ np.uint64(1 << 63), rng.integers(0, 2 ** 63, 30, dtype=np.uint64)])
    d = hamming(a, b)
    assert d.shape == (50, 35)
    assert all(d[i, j] == bits(int(a[i]) ^ int(b[j])) for i in range(50) for j in range(35))
    assert (np.diag(d[:5, :5]) == 1).all()  # the top bit counts


# ---------------------------------------------------------------------------------------------- the pair finder
def test_cross_split_pairs_distance_order_threshold_and_sides():
    hashes = {"t1": 0b0000, "t2": 0b0111, "t3": 0xFFFF_0000_0000_0000, "u": 0b1, "x": 0b1,
              "s1": 0b0001, "s2": 0b0011, "s3": 0xFFFF_0000_0000_0001}
    split = {"t1": "train", "t2": "train", "t3": "train", "u": "unused", "s1": "test", "s2": "test", "s3": "test"}
    pairs = cross_split_pairs(hashes, split, max_distance=2)
    assert pairs == [("t1", "s1", 1), ("t2", "s2", 1), ("t3", "s3", 1), ("t1", "s2", 2), ("t2", "s1", 2)]
    assert all(isinstance(p, NearDuplicate) for p in pairs) and pairs[0].distance == 1
    assert cross_split_pairs(hashes, split, max_distance=0) == []
    assert len(cross_split_pairs(hashes, split, max_distance=64)) == 9  # every train x test pair, no unused "u"
    assert cross_split_pairs(hashes, {"t1": "train"}) == []  # no test side
    assert pairs_text(pairs, shown=2) == "t1 ~ s1 (1 bit), t2 ~ s2 (1 bit) and 3 more"


def test_cross_split_pairs_of_a_thousand_by_a_thousand_is_fast_and_exact():
    rng = np.random.default_rng(1)
    train = rng.integers(0, 2 ** 63, 1000, dtype=np.uint64)
    test = rng.integers(0, 2 ** 63, 1000, dtype=np.uint64)
    test[[10, 500]] = train[[3, 999]] ^ np.uint64(0b101)  # two planted copies, 2 bits off
    hashes = {f"a{i:04d}": int(h) for i, h in enumerate(train)} | {f"b{i:04d}": int(h) for i, h in enumerate(test)}
    split = {k: "train" if k[0] == "a" else "test" for k in hashes}
    start = time.perf_counter()
    pairs = cross_split_pairs(hashes, split)
    assert time.perf_counter() - start < 5  # ~0.1 s; loose: the machine may be busy
    assert pairs == [("a0003", "b0010", 2), ("a0999", "b0500", 2)]
    d = hamming(train[:40], test)  # brute force on a slice: the matrix is every pair's popcount
    assert d.min() >= 0 and sorted(d[d <= MAX_DISTANCE].tolist()) == [2]


# ---------------------------------------------------------------------------------------------- real-data folders
def write_folder(root, seeds_train=range(6), seeds_other=range(50, 54), masks=True):
    """A canonical folder: train frames of ``seeds_train``; test holds a crafted copy of each of the first four
    (resized, JPEG q60, shifted 1 px, cropped) and frames of other textures; splits.csv says which is which."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    files, split = {}, {}
    for s in seeds_train:
        files[f"tr{s}.png"] = Image.fromarray(frame(s))
        split[f"tr{s}"] = "train"
    kinds = ["resized up", "jpeg q60", "shifted 1 px", "cropped 1-2 px a side"]
    for s, kind in zip(seeds_train, kinds):
        im = copies(s)[kind]
        files[f"te{s}.{'jpg' if kind.startswith('jpeg') else 'png'}"] = im
        split[f"te{s}"] = "test"
    for s in seeds_other:
        files[f"other{s}.png"] = Image.fromarray(frame(s))
        split[f"other{s}"] = "test"
    for name, im in files.items():
        if name.endswith(".jpg"):
            (root / "images" / name).write_bytes(jpeg(np.asarray(im.convert("L"))))
        else:
            im.save(root / "images" / name)
        if masks:
            m = np.zeros((im.height, im.width), np.uint8)
            m[10:20, 10:30] = 255 if hash(name) % 2 else 0
            m[5:15, 40:50] = 255
            Image.fromarray(m).save(root / "masks" / f"{name.rsplit('.', 1)[0]}.png")
    (root / "splits.csv").write_text("id,split\n" + "".join(f"{i},{s}\n" for i, s in split.items()))
    return root


EXPECTED = {("tr0", "te0"), ("tr1", "te1"), ("tr2", "te2"), ("tr3", "te3")}


def test_near_duplicates_of_a_real_data_folder(tmp_path):
    data = load_real_data(write_folder(tmp_path / "d"), "auto", max_pixels=10 ** 8, split_missing="error")
    split = split_ids(data, 0.3, 0)
    pairs = near_duplicates(data.items, split)
    assert {(p.train, p.test) for p in pairs} == EXPECTED, pairs
    assert [p.distance for p in pairs] == sorted(p.distance for p in pairs)
    hashes = hash_items(data.items)
    assert set(hashes) == {i.id for i in data.items} and hashes["tr0"] == phash(frame(0))
    assert near_duplicates(data.items, {i: ("test" if s == "train" else "unused") for i, s in split.items()}) == []


def test_an_unreadable_image_is_named(tmp_path):
    from synthvit.data import DataError, Item

    good = Item(id="ok", source="mem", load=lambda: Image.fromarray(frame(0)))
    bad = Item(id="broken", source="images/broken.png", load=lambda: Image.open(io.BytesIO(b"not an image")))
    with pytest.raises(DataError, match="images/broken.png: cannot hash 'broken'"):
        hash_items([good, bad])


# ---------------------------------------------------------------------------------------------- finetune, compare
def test_finetune_warns_once_and_records_the_pairs(tmp_path, cli, caplog):
    """A one-step finetune in this process (its log records reach caplog)."""
    data = write_folder(tmp_path / "d")
    run = tmp_path / "run"
    with caplog.at_level("INFO"):
        res = cli("finetune", f"data={data}", f"out_dir={run}", "model=vit_tiny_patch16_224", "crop_size=32",
                  "steps=1", "batch_size=2", "num_workers=0", "evaluate=false", "calibrate.rule=argmax",
                  "optim.warmup_steps=0")
    assert res.returncode == 0, res.stderr[-3000:]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "near-dup" in r.getMessage()]
    assert len(warnings) == 1, caplog.text[-3000:]
    assert "4 train/test pair(s)" in warnings[0] and "leaks test content into" in warnings[0]
    for train, test in EXPECTED:
        assert f"{train} ~ {test} (" in warnings[0]
    assert "other5" not in warnings[0]
    record = json.loads((run / "near_duplicates.json").read_text())
    assert record["max_distance"] == MAX_DISTANCE and (record["train_images"], record["test_images"]) == (6, 8)
    assert {(p["train"], p["test"]) for p in record["pairs"]} == EXPECTED
    assert all(0 <= p["distance"] <= MAX_DISTANCE for p in record["pairs"])


def test_finetune_check_is_off_at_distance_0_and_quiet_without_pairs(tmp_path, caplog):
    from finetune.config import FinetuneConfig
    from finetune.run import _check_near_duplicates

    data = load_real_data(write_folder(tmp_path / "d"), "auto", max_pixels=10 ** 8, split_missing="error")
    train = [i for i in data.items if i.id.startswith("tr")]
    others = [i for i in data.items if i.id.startswith("other")]
    run = tmp_path / "run"
    run.mkdir()
    with caplog.at_level("INFO", logger="synthvit.finetune"):
        assert _check_near_duplicates(FinetuneConfig(data="d"), run, train, others) == []
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert "near-duplicates across the split: none" in caplog.text
    assert json.loads((run / "near_duplicates.json").read_text())["pairs"] == []
    assert _check_near_duplicates(FinetuneConfig(data="d", near_duplicate_distance=0), run, train, others) == []
    assert not (run / "near_duplicates.json").exists()  # off: no record, and no earlier run's either


def test_near_duplicate_distance_is_validated():
    from finetune.config import FinetuneConfig
    from synthvit.config import ConfigError

    with pytest.raises(ConfigError, match="near_duplicate_distance: 64 must be in 0..63"):
        FinetuneConfig(near_duplicate_distance=64)


def test_compare_reports_the_pairs_in_its_data_note(tmp_path):
    from synthvit.compare.config import CompareConfig
    from synthvit.compare.report import Report
    from synthvit.compare.run import _data_note, _near_duplicates

    data = load_real_data(write_folder(tmp_path / "d"), "auto", max_pixels=10 ** 8, split_missing="error")
    split = split_ids(data, 0.3, 0)
    cfg = CompareConfig(data=str(tmp_path / "d"), out_dir=str(tmp_path / "cmp"))
    out = tmp_path / "cmp"
    out.mkdir()
    line = _near_duplicates(cfg, data, split, out)
    assert line.startswith("**Near-duplicates across the split: 4 train/test pair(s)** (pHash, Hamming distance "
                           f"<= {MAX_DISTANCE} of 64 bits")
    assert all(f"{a} ~ {b} (" in line for a, b in EXPECTED)
    assert {(p["train"], p["test"]) for p in json.loads((out / "near_duplicates.json").read_text())["pairs"]} == \
        EXPECTED
    report = Report("r")
    report.add("p", _data_note(cfg, data, 6, 8, line))
    assert "6 train and 8 test images" in report.markdown() and "4 train/test pair(s)" in report.markdown()
    assert "<b>Near-duplicates across the split: 4 train/test pair(s)</b>" in report.html()

    clean = {i: s for i, s in split.items() if i not in {"te0", "te1", "te2", "te3"}}
    kept = [i for i in data.items if i.id in clean]
    data.items = kept
    assert _near_duplicates(cfg, data, clean, out) == (f"Near-duplicates across the split: none found (pHash, Hamming "
                                                       f"distance <= {MAX_DISTANCE} of 64 bits).")
    cfg.finetune.near_duplicate_distance = 0
    assert "not checked" in _near_duplicates(cfg, data, clean, out) and not (out / "near_duplicates.json").exists()

import json

import numpy as np
import pytest

from generate.schema import (
    INFO_FILE,
    Sample,
    decode_sample,
    encode_sample,
    iter_shard,
    main_class,
    read_info,
    verify_dataset,
)
from synthvit.io import SynthvitError


def test_encode_decode_round_trip_lossless():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), np.uint8)
    mask[2:5, 3:9] = 4
    s = Sample(image, mask, 4, {"defects": [{"class": 4, "area": 18, "bbox": [3, 2, 9, 5]}]})
    members = encode_sample(12, s, image_format="png")
    assert members["__key__"] == "00000012" and set(members) == {"__key__", "png", "mask.png", "cls", "json"}
    back = decode_sample(members)
    assert np.array_equal(back.image, image) and np.array_equal(back.mask, mask)
    assert back.cls == 4 and back.meta == s.meta
    gray = encode_sample(1, Sample(image[..., 0], mask, 4, {}))
    assert "jpg" in gray and decode_sample(gray).image.ndim == 2


def test_decode_names_missing_members():
    with pytest.raises(SynthvitError, match="00000003 lacks mask.png"):
        decode_sample({"__key__": "00000003", "jpg": b"", "cls": b"0", "json": b"{}"})


def test_main_class_ties_and_empty():
    m = np.zeros((4, 4), np.uint8)
    assert main_class(m, 5) == 0
    m[0, :2] = 3
    m[1, :2] = 2
    assert main_class(m, 5) == 2
    m[2, 0] = 3
    assert main_class(m, 5) == 3


def test_info_matches_timm_schema(tiny_dataset):
    info = json.loads((tiny_dataset / INFO_FILE).read_text())
    split = info["splits"]["train"]
    assert info["name"] == "synthvit" and split["name"] == "train"
    assert split["num_samples"] == 40 == sum(split["shard_lengths"])
    assert split["filenames"] == [f"synthvit-{i:06d}.tar" for i in range(5)]
    assert len(split["sha256"]) == 5 and all(len(h) == 64 for h in split["sha256"])
    assert info["class_names"][0] == "good" and len(info["class_names"]) == 8
    assert info["generator"]["backend"] == "procedural" and info["generator"]["image_size"] == 48
    samples = [s for f in split["filenames"] for s in iter_shard(tiny_dataset / f)]
    assert [s.meta["index"] for s in samples] == list(range(40))


def test_read_info_errors(tmp_path):
    with pytest.raises(SynthvitError, match="does not exist"):
        read_info(tmp_path / "nope")
    with pytest.raises(SynthvitError, match="_info.json is missing"):
        read_info(tmp_path)
    (tmp_path / INFO_FILE).write_text("{not json")
    with pytest.raises(SynthvitError, match="not valid JSON"):
        read_info(tmp_path)
    (tmp_path / INFO_FILE).write_text('{"name": "x", "splits": {}}')
    with pytest.raises(SynthvitError, match="lacks the key 'class_names'"):
        read_info(tmp_path)


def test_verify_names_missing_and_corrupt_shards(tiny_dataset, tmp_path):
    import shutil

    ds = tmp_path / "copy"
    shutil.copytree(tiny_dataset, ds)
    assert verify_dataset(ds) == []
    (ds / "synthvit-000001.tar").unlink()
    data = bytearray((ds / "synthvit-000003.tar").read_bytes())
    data[700] ^= 0xFF
    (ds / "synthvit-000003.tar").write_bytes(bytes(data))
    problems = verify_dataset(ds)
    assert problems == ["synthvit-000001.tar: missing",
                        "synthvit-000003.tar: sha256 differs from the manifest (corrupt or modified)"]

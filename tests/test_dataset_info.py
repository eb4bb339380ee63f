"""The shard contract's ``_info.json`` read and written through :class:`generate.schema.DatasetInfo`, including the
manifests earlier versions wrote (``tests/data/legacy``)."""
import json
import shutil
from pathlib import Path

import pytest

from generate.schema import INFO_FILE, DatasetInfo, ShardEntry, make_info, read_info, write_info
from synthvit.io import SynthvitError

LEGACY = Path(__file__).parent / "data" / "legacy"


def _folder_with(tmp_path, name: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copy(LEGACY / name, tmp_path / INFO_FILE)
    return tmp_path


def test_a_legacy_manifest_reads_with_its_values(tmp_path):
    info = read_info(_folder_with(tmp_path, "shards_info.json"))
    assert info.name == "synthvit" and info.schema == "synthvit.shards/1"
    assert info.class_names[:3] == ["good", "crack", "scratch"] and info.num_classes == 8
    assert info.num_samples == 64 and info.filenames == [f"synthvit-{i:06d}.tar" for i in range(4)]
    assert [s.num_samples for s in info.shards] == [16] * 4 and all(len(s.sha256) == 64 for s in info.shards)
    assert info.generator["backend"] == "procedural" and info.extra == {}


def test_a_legacy_manifest_keeps_the_backends_records(tmp_path):
    info = read_info(_folder_with(tmp_path, "shards_backgrounds_info.json"))
    assert info.num_samples == 32 and info.extra["backgrounds"]["ids"] == [f"f{i}" for i in range(6)]


@pytest.mark.parametrize("name", ["shards_info.json", "shards_backgrounds_info.json"])
def test_legacy_manifests_round_trip_to_the_same_json(tmp_path, name):
    doc = json.loads((LEGACY / name).read_text())
    info = DatasetInfo.from_json(doc, name)
    assert info.to_json() == doc and list(info.to_json()) == list(doc)  # same keys, values and key order
    write_info(tmp_path, info)
    assert read_info(tmp_path) == info


def test_a_fresh_manifest_round_trips(tmp_path):
    info = make_info("demo", [("demo-000000.tar", 3, "a" * 64), ("demo-000001.tar", 2, "b" * 64)],
                     ["good", "crack"], {"seed": 0}, extra={"backgrounds": {"count": 1}})
    write_info(tmp_path, info)
    doc = json.loads((tmp_path / INFO_FILE).read_text())
    assert doc["splits"]["train"] == {"name": "train", "num_samples": 5, "filenames": info.filenames,
                                      "shard_lengths": [3, 2], "sha256": ["a" * 64, "b" * 64]}
    assert doc["num_classes"] == 2 and doc["backgrounds"] == {"count": 1}
    assert read_info(tmp_path) == info and info.shards[1] == ShardEntry("demo-000001.tar", 2, "b" * 64)


def test_a_manifest_without_hashes_reads_and_writes_without_them(tmp_path):
    doc = json.loads((LEGACY / "shards_info.json").read_text())
    del doc["splits"]["train"]["sha256"]
    info = DatasetInfo.from_json(doc, "old.json")
    assert all(s.sha256 is None for s in info.shards) and info.to_json() == doc


@pytest.mark.parametrize("doc, message", [
    ([1, 2], "not a synthvit shards manifest"),
    ({"name": "x", "splits": {}}, "lacks the key 'class_names'"),
    ({"name": "x", "class_names": "good,crack", "splits": {}}, "class_names must be a list of names"),
    ({"name": "x", "class_names": ["good"], "splits": []}, "splits.train must hold filenames"),
    ({"name": "x", "class_names": ["good"], "splits": {"train": {"filenames": ["a.tar"], "shard_lengths": [1, 2],
                                                                 "num_samples": 3}}}, "one shard_lengths count"),
])
def test_malformed_manifests_name_the_file_and_key(tmp_path, doc, message):
    (tmp_path / INFO_FILE).write_text(json.dumps(doc))
    with pytest.raises(SynthvitError, match=message) as e:
        read_info(tmp_path)
    assert INFO_FILE in str(e.value)

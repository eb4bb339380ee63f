import errno
import glob
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, assert_cli_error, run_cli, tiny_overrides
from generate.config import DEFECT_KEYS, GenerateConfig
from generate.run import run
from generate.schema import INFO_FILE, iter_shard
from synthvit.config import load_config
from synthvit.io import SynthvitError, atomic_open


def generate(out, **extra):
    return run(load_config(GenerateConfig, overrides=tiny_overrides(out, **extra)))


def tree_bytes(folder: Path, pattern="*.tar") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern))}


def test_identical_bytes_for_any_worker_count(tiny_dataset, tmp_path):
    generate(tmp_path / "w2", num_workers=2)
    assert tree_bytes(tmp_path / "w2") == tree_bytes(tiny_dataset)
    assert (tmp_path / "w2" / INFO_FILE).read_bytes() == (tiny_dataset / INFO_FILE).read_bytes()


def test_shards_are_plain_ustar_with_fixed_metadata(tiny_dataset):
    # one header per member (no PAX extended headers, which a float mtime would add before each: +1 KiB and a
    # second header for every reader to parse), and nothing of the machine or the day in them
    import tarfile

    for shard in sorted(tiny_dataset.glob("*.tar")):
        raw = shard.read_bytes()
        assert b"PaxHeader" not in raw, shard
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
        assert members and all(m.pax_headers == {} for m in members)
        assert {(m.mtime, m.uname, m.gname, m.uid, m.gid) for m in members} == {(0, "synthvit", "synthvit", 0, 0)}


def test_shards_of_earlier_versions_with_pax_headers_still_read(tiny_dataset, tmp_path):
    # before 2026-12-04 a float mtime put a PAX header before every member; such shards read to the same samples
    import tarfile

    import webdataset as wds

    shard = sorted(tiny_dataset.glob("*.tar"))[0]
    old = tmp_path / shard.name
    with tarfile.open(shard) as tar, open(old, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0.0, user="synthvit", group="synthvit")
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        for key in dict.fromkeys(name.split(".", 1)[0] for name, _ in members):
            writer.write({"__key__": key} | {n.split(".", 1)[1]: b for n, b in members if n.split(".", 1)[0] == key})
        writer.close()
    assert b"PaxHeader" in old.read_bytes()
    def samples(path):
        return [(s.image.tobytes(), s.mask.tobytes(), s.cls, s.meta) for s in iter_shard(path)]
    assert samples(old) == samples(shard) and len(samples(old)) > 0


def test_samples_do_not_depend_on_shard_size(tiny_dataset, tmp_path):
    generate(tmp_path / "s7", samples_per_shard=7)
    def samples(folder):
        return {s.meta["index"]: (s.image.tobytes(), s.mask.tobytes(), s.cls)
                for f in sorted(folder.glob("*.tar")) for s in iter_shard(f)}
    assert len(list((tmp_path / "s7").glob("*.tar"))) == 6
    assert samples(tmp_path / "s7") == samples(tiny_dataset)


def test_timm_reader(tiny_dataset):
    import timm.data

    ds = timm.data.create_dataset("wds/synthvit", root=str(tiny_dataset), split="train")
    items = list(ds)
    assert len(items) == 40 == len(ds)
    labels = sorted(t for _, t in items)
    expected = sorted(s.cls for f in sorted(tiny_dataset.glob("*.tar")) for s in iter_shard(f))
    assert labels == expected and len(set(labels)) > 2
    assert items[0][0].size == (48, 48)


def test_hf_datasets_reader(tiny_dataset):
    import datasets

    files = sorted(glob.glob(str(tiny_dataset / "*.tar")))
    ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train")
    assert ds.num_rows == 40
    ours = {s.meta["index"]: s for f in files for s in iter_shard(f)}
    for row in ds.select(range(0, 40, 7)):
        s = ours[int(row["__key__"])]
        assert row["cls"] == s.cls
        assert np.array_equal(np.asarray(row["mask.png"]), s.mask)
        assert [d["class"] for d in row["json"]["defects"]] == [d["class"] for d in s.meta["defects"]]


def test_outputs_config_and_preview(tiny_dataset):
    import yaml

    cfg = yaml.safe_load((tiny_dataset / "config.yaml").read_text())
    assert cfg["num_samples"] == 40 and cfg["procedural"]["camera"]["noise"] == 4.0
    with Image.open(tiny_dataset / "preview.png") as im:
        assert im.format == "PNG" and im.width >= 2 * 192
    assert not list(tiny_dataset.glob(".*"))  # no temporaries left behind


KILL_RUN = dict(num_samples=1200, samples_per_shard=20, image_size=256, num_workers=2, preview=0)  # 60 shards


def _start(out, *extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, "-m", "synthvit", "generate", *tiny_overrides(out, **KILL_RUN), *extra]
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The KILL_RUN dataset generated in one go (in-process): what every interrupted-and-resumed run must equal."""
    full = tmp_path_factory.mktemp("uninterrupted") / "full"
    generate(full, **KILL_RUN)
    return full


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_kill_and_resume_gives_identical_bytes(tmp_path, uninterrupted, sig):
    out = tmp_path / "killed"
    proc = _start(out)
    deadline = time.time() + 120
    while len(list(out.glob("*.tar"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    finished = len(list(out.glob("*.tar")))
    assert 3 <= finished < 60, f"the run should have been interrupted midway:\n{err.decode()[-2000:]}"
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and b"interrupted; finished work is kept" in err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (out / INFO_FILE).exists()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    resumed = run_cli("generate", *tiny_overrides(out, **dict(KILL_RUN, num_workers=1)), check=True)
    assert "resuming" in resumed.stderr
    # finished shards were not redone
    assert all((out / n).stat().st_mtime_ns == t for n, t in before.items())
    assert tree_bytes(out) == tree_bytes(uninterrupted) and len(tree_bytes(uninterrupted)) == 60
    assert (out / INFO_FILE).read_bytes() == (uninterrupted / INFO_FILE).read_bytes()
    assert not list(out.glob(".*"))


def test_verify_cli(tiny_dataset, tmp_path, cli, caplog):
    import shutil

    caplog.set_level(logging.INFO, logger="synthvit")
    ok = cli("generate", f"out_dir={tiny_dataset}", "verify=true")
    assert ok.returncode == 0 and f"verified {tiny_dataset}: 5 shards, 40 samples match" in caplog.text
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dataset, bad)
    (bad / "synthvit-000002.tar").write_bytes(b"garbage")
    res = cli("generate", f"out_dir={bad}", "verify=true")
    assert_cli_error(res, 1, "synthvit-000002.tar: sha256 differs")
    res = cli("generate", f"out_dir={tmp_path / 'none'}", "verify=true")
    assert_cli_error(res, 1, "does not exist")
    assert not (tmp_path / "none").exists()


def test_bad_output_folders(tiny_dataset, tmp_path, cli):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    res = cli("generate", *tiny_overrides(foreign))
    assert_cli_error(res, 1, "is not empty and holds no synthvit dataset (found holiday.jpg)")
    assert sorted(p.name for p in foreign.iterdir()) == ["holiday.jpg"]
    before = tree_bytes(tiny_dataset, "*")
    res = cli("generate", *tiny_overrides(tiny_dataset, seed=3))
    assert_cli_error(res, 1, "different config (seed: 0 -> 3)")
    assert tree_bytes(tiny_dataset, "*") == before  # the dataset is left as it was
    a_file = tmp_path / "file"
    a_file.write_text("")
    res = cli("generate", *tiny_overrides(a_file / "sub"))
    assert_cli_error(res, 1, f"out_dir: {a_file / 'sub'} cannot be created: {a_file} is a file")
    res = cli("generate", *tiny_overrides(tmp_path / "x", image_size="100000x10"))
    assert_cli_error(res, 2, "image_size: 100000x10 is impossible")
    res = cli("generate", *tiny_overrides(tmp_path / "x", backend="gan"))
    assert_cli_error(res, 2, "backend", "'gan'")
    assert not (tmp_path / "x").exists()


def test_exit_codes_in_a_real_process(tmp_path):
    """What only a process shows: the exit status of `python -m synthvit` and a stderr of one line, no traceback,
    for a config error (2) and a user error (1)."""
    res = run_cli("generate", *tiny_overrides(tmp_path / "x", image_size="100000x10"))
    assert_cli_error(res, 2, "image_size: 100000x10 is impossible")
    assert res.stderr.strip().startswith("synthvit generate: config error:") and res.stdout == ""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    res = run_cli("generate", *tiny_overrides(foreign))
    assert_cli_error(res, 1, "holds no synthvit dataset (found holiday.jpg)")
    assert res.stdout == "" and not (tmp_path / "x").exists()


def test_complete_dataset_rerun_is_a_noop(tiny_dataset):
    before = tree_bytes(tiny_dataset)
    generate(tiny_dataset)
    assert tree_bytes(tiny_dataset) == before


def test_dataset_of_the_old_key_layout_resumes(tiny_dataset, tmp_path):
    """A dataset whose config.yaml holds the defect keys under procedural (before the defects.* group) is the same
    dataset: a rerun resumes it; a real change of a defect key is still refused."""
    import shutil

    import yaml

    old = tmp_path / "old"
    shutil.copytree(tiny_dataset, old)
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    defects = cfg.pop("defects")
    cfg["procedural"].update({k: defects[k] for k in DEFECT_KEYS})  # the keys of that layout (none added since)
    (old / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    before = tree_bytes(old)
    with pytest.raises(SynthvitError, match=r"different config \(defects.max_defects: 3 -> 2\)"):
        generate(old, **{"defects.max_defects": 2})
    generate(old)
    assert tree_bytes(old) == before
    assert "defects" in yaml.safe_load((old / "config.yaml").read_text())


class _FullDisk:
    def __init__(self, f, budget):
        self.f, self.budget = f, budget

    def write(self, data):
        self.budget -= len(data)
        if self.budget < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


# The abandoned tar stream tries to flush into the (still full) disk when garbage-collected: expected here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_disk_full_leaves_no_half_shard(tmp_path, monkeypatch):
    import generate.writer as writer

    real = writer.atomic_open

    def full_disk_open(path):
        class Ctx:
            def __enter__(self):
                self.cm = real(path)
                return _FullDisk(self.cm.__enter__(), budget=30_000)

            def __exit__(self, *exc):
                return self.cm.__exit__(*exc)
        return Ctx()

    monkeypatch.setattr(writer, "atomic_open", full_disk_open)
    out = tmp_path / "full"
    with pytest.raises(SynthvitError, match=r"no space left on the device while writing .*synthvit-000000.tar"):
        generate(out)
    assert not list(out.glob("*.tar")) and not list(out.glob(".*tmp")) and not (out / INFO_FILE).exists()
    monkeypatch.setattr(writer, "atomic_open", real)
    generate(out)  # after freeing space, the same command completes the dataset
    assert json.loads((out / INFO_FILE).read_text())["splits"]["train"]["num_samples"] == 40


def test_atomic_open_removes_partial_file(tmp_path):
    target = tmp_path / "f.bin"
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write(b"half")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def _archive(fmt, members, compression=""):
    """A tar archive in ``fmt`` holding ``members`` (name -> bytes) and a directory entry, as bytes."""
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}", format=fmt) as tar:
        d = tarfile.TarInfo("a-directory")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5  # a float mtime: a PAX record in PAX_FORMAT
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _Trickle(io.RawIOBase):
    """A stream that returns at most 100 bytes per read, as a remote object may."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def readable(self):
        return True

    def readinto(self, buf):
        out = self.data[self.pos:self.pos + min(len(buf), 100)]
        buf[:len(out)] = out
        self.pos += len(out)
        return len(out)


@pytest.mark.parametrize("fmt", ["USTAR", "PAX", "GNU"])
@pytest.mark.parametrize("compression", ["", "gz"])
def test_tar_members_reads_what_tarfile_reads(fmt, compression):
    """The ustar reader of the shard contract gives tarfile's regular members -- ustar prefixes, PAX paths, GNU long
    names, a compressed archive (read by tarfile), a stream that trickles -- and skips directories."""
    import tarfile

    from generate.schema import tar_members

    long = "d" * 60 + "/" + "e" * 80 + ".jpg"  # over 100 characters: prefix (ustar), path record (PAX), L (GNU)
    members = {"00000000.jpg": b"\xff" * 700, "00000000.cls": b"3", long: bytes(range(256)) * 3, "empty.txt": b""}
    data = _archive(getattr(tarfile, f"{fmt}_FORMAT"), members, compression)
    assert list(tar_members(io.BytesIO(data))) == list(members.items())
    assert list(tar_members(io.BufferedReader(_Trickle(data), 64))) == list(members.items())


def test_tar_members_of_a_damaged_archive_raise_after_the_whole_members():
    import tarfile

    from generate.schema import tar_members

    data = _archive(tarfile.USTAR_FORMAT, {"a.jpg": b"x" * 1000, "b.jpg": b"y" * 1000})
    got = []
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        for member in tar_members(io.BytesIO(data[:512 * 5 + 100])):  # cut inside b.jpg's content
            got.append(member)
    assert got == [("a.jpg", b"x" * 1000)]
    bad = bytearray(data)
    bad[512 + 10] ^= 1  # a bit of a.jpg's name (its header follows the directory's, which has no content)
    with pytest.raises(tarfile.ReadError, match="checksum|magic"):
        list(tar_members(io.BytesIO(bytes(bad))))

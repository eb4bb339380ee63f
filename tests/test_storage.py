"""Shards in object storage, against a real S3 server (SeaweedFS, started by the ``s3`` fixture on 127.0.0.1), and
read-only over HTTP: the same bytes, resumes, errors and batches as on local disk, and no credential in any file."""
import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, TINY_PRETRAIN, accelerate_launch, assert_cli_error, run_cli, tiny_overrides
from generate.config import GenerateConfig
from generate.run import run as generate_run
from generate.schema import INFO_FILE, iter_shard, verify_dataset
from pretrain.data import SkipCounter, tar_samples
from synthvit.config import load_config
from synthvit.storage import Folder, StorageError, open_stream, register_webdataset_schemes, transient
from test_pretrain_data import same, spec_for, take

KILL_RUN = dict(num_samples=1200, samples_per_shard=20, image_size=256, num_workers=2, preview=0)  # 60 shards


def object_paths(s3, prefix: str, fs=None) -> list[str]:
    """The objects under ``prefix`` as the server lists them now (no cached listing)."""
    fs = fs or s3.filesystem()
    try:
        return [p for p in fs.ls(f"{s3.bucket}/{prefix}", refresh=True) if not p.endswith("/")]
    except FileNotFoundError:
        return []


def objects(s3, prefix: str) -> dict[str, bytes]:
    fs = s3.filesystem()
    return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in object_paths(s3, prefix, fs)}


def upload(s3, folder: Path, prefix: str) -> str:
    fs = s3.filesystem()
    for p in sorted(folder.iterdir()):
        if p.is_file():
            fs.put_file(str(p), f"{s3.bucket}/{prefix}/{p.name}")
    return s3.url(prefix)


def dataset_bytes(folder: Path) -> dict[str, bytes]:
    """What must be identical wherever the dataset is written: shards and manifest (config.yaml names out_dir)."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name.endswith(".tar") or p.name == INFO_FILE}


def assert_no_secret(secret: str, *places) -> None:
    """No file under the given folders, and no text given, holds the secret key."""
    needle = secret.encode()
    for place in places:
        if isinstance(place, (str, bytes)):
            assert needle not in (place.encode() if isinstance(place, str) else place)
            continue
        for p in Path(place).rglob("*"):
            if p.is_file():
                assert needle not in p.read_bytes(), f"the secret key is written in {p}"


def started(out_url: str, s3, prefix: str, log: Path, **extra) -> subprocess.Popen:
    """``python -m synthvit generate`` of KILL_RUN into ``out_url`` in the background; returns once 3 shards exist."""
    args = [sys.executable, "-m", "synthvit", "generate", *tiny_overrides(out_url, **(KILL_RUN | extra))]
    with open(log, "w") as f:
        proc = subprocess.Popen(args, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while sum(n.endswith(".tar") for n in object_paths(s3, prefix)) < 3:  # a listing: a poll must stay short
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "no shard uploaded in 180 s"
        time.sleep(0.1)
    return proc


@pytest.fixture(scope="module")
def kill_run_local(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "full"
    generate_run(load_config(GenerateConfig, overrides=tiny_overrides(out, **KILL_RUN)))
    return out


# ---------------------------------------------------------------------------------------------- no server needed
@pytest.mark.parametrize("url, message, secret", [
    ("https://user:tok3n@example.com/ds", "credentials in a URL are refused", "tok3n"),
    ("https://example.com/ds?X-Amz-Signature=s1gn", "query or fragment", "s1gn"),
    ("ftp://example.com/ds", "the scheme ftp:// is not supported", None),
    ("s3:///ds", "no bucket or host", None),
])
def test_urls_that_cannot_name_a_dataset_are_refused_without_repeating_a_secret(url, message, secret):
    with pytest.raises(StorageError) as e:
        Folder(url)
    assert message in str(e.value)
    assert secret is None or secret not in str(e.value)


def test_https_is_read_only(cli):
    assert_cli_error(cli("generate", "out_dir=https://example.com/ds", "num_samples=4"), 1,
                     "https:// is read-only", "s3://")


def test_which_errors_are_retried():
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    assert transient(ConnectionRefusedError("refused")) and transient(TimeoutError())
    assert transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert not transient(FileNotFoundError("gone")) and not transient(PermissionError("denied"))
    assert not transient(NoCredentialsError()) and not transient(StorageError("already final"))


def test_lost_connection_tracebacks_of_the_s3_client_are_not_shown(caplog):
    # aiohttp (under s3fs) can leave a write task failing on a transport the server closed; asyncio then logs
    # "Task exception was never retrieved" with a traceback. The request is retried or reported by synthvit in one
    # line, so that record is dropped -- and only that one.
    import asyncio
    import logging

    from synthvit.storage import _quiet_lost_connections

    _quiet_lost_connections()
    _quiet_lost_connections()  # once per process, however often filesystems are made
    assert len(logging.getLogger("asyncio").filters) == 1
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for exc in (ConnectionResetError("Cannot write to closing transport"), ValueError("a real bug")):
                loop.call_exception_handler({"message": "Task exception was never retrieved", "exception": exc})
            loop.call_exception_handler({"message": "an unclosed client session", "exception": ConnectionError()})
    finally:
        loop.close()
    kept = [(r.getMessage(), type(r.exc_info[1])) for r in caplog.records if r.name == "asyncio"]
    assert kept == [("Task exception was never retrieved", ValueError), ("an unclosed client session", ConnectionError)]


def test_shards_read_over_https_are_the_batches_of_the_local_folder(tiny_dataset):
    """A read-only web server holding the dataset (HTTP cannot list: the reader opens what _info.json names)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_dataset.parent))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{tiny_dataset.name}"
        assert verify_dataset(url) == []
        local = take(spec_for(tiny_dataset), 2, 6)
        remote = take(spec_for(url), 2, 6)
        assert all(same(a, b) for a, b in zip(local, remote))
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------------------------- a real S3 server
def test_generate_to_a_bucket_is_byte_identical_and_reads_back_with_timm_and_hf(s3, tiny_dataset, tmp_path,
                                                                                 monkeypatch):
    import datasets
    import timm.data

    url = s3.url("tiny")
    assert generate_run(load_config(GenerateConfig, overrides=tiny_overrides(url, num_workers=2))) == url
    got, want = objects(s3, "tiny"), dataset_bytes(tiny_dataset)
    assert {k: got[k] for k in want} == want
    assert set(got) == set(want) | {"config.yaml", "preview.png"}
    assert f"out_dir: {url}" in got["config.yaml"].decode()

    register_webdataset_schemes()  # webdataset's gopen (and so timm's wds/ reader) opens s3:// through fsspec
    items = list(timm.data.create_dataset("wds/synthvit", root=url, split="train"))
    expected = sorted(s.cls for f in sorted(tiny_dataset.glob("*.tar")) for s in iter_shard(f))
    assert len(items) == 40 and sorted(t for _, t in items) == expected

    # HF datasets' fsspec reader (its offline switch is for the Hub, not for this server)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    rows = list(datasets.load_dataset("webdataset", data_files={"train": f"{url}/*.tar"}, split="train",
                                      cache_dir=str(tmp_path / "hf")))
    ours = {s.meta["index"]: s for f in sorted(tiny_dataset.glob("*.tar")) for s in iter_shard(f)}
    assert len(rows) == 40
    for row in rows[::9]:
        s = ours[int(row["__key__"])]
        assert row["cls"] == s.cls and np.array_equal(np.asarray(row["mask.png"]), s.mask)
    assert_no_secret(s3.secret_key, tmp_path, *got.values())


def test_wrong_credentials_and_missing_datasets_are_named_before_any_work(s3, cli, monkeypatch):
    from synthvit import storage

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-key-0123")
    storage._filesystem.cache_clear()  # clients are made once per process: this one must see the wrong key
    try:
        res = cli("generate", f"out_dir={s3.url('denied')}", "num_samples=4")
    finally:
        storage._filesystem.cache_clear()
    assert_cli_error(res, 1, f"out_dir {s3.url('denied')} is not writable", "access denied",
                     "check the credentials")
    assert "not-the-key-0123" not in res.stderr + res.stdout
    monkeypatch.undo()
    res = cli("pretrain", f"data=[{s3.url('nothing-here')}]", "out_dir=unused", *TINY_PRETRAIN)
    assert_cli_error(res, 1, f"{s3.url('nothing-here')}/_info.json is missing", "not a finished synthvit dataset")


@pytest.mark.slow
def test_generate_killed_mid_upload_resumes_to_identical_bytes(s3, kill_run_local, tmp_path):
    url = s3.url("killed")
    proc = started(url, s3, "killed", tmp_path / "first.log")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = objects(s3, "killed")
    assert INFO_FILE not in partial and sum(n.endswith(".tar") for n in partial) < 60
    res = run_cli("generate", *tiny_overrides(url, **KILL_RUN), check=True)
    assert "resuming" in res.stderr
    got = objects(s3, "killed")
    assert {k: got[k] for k in dataset_bytes(kill_run_local)} == dataset_bytes(kill_run_local)
    assert_no_secret(s3.secret_key, tmp_path, res.stderr, res.stdout, *got.values())


@pytest.mark.slow
def test_a_server_that_goes_away_is_named_then_the_run_resumes(s3, kill_run_local, tmp_path):
    url = s3.url("away")
    log = tmp_path / "first.log"
    proc = started(url, s3, "away", log)
    s3.stop()
    try:
        proc.wait(timeout=240)
        text = log.read_text()
        assert proc.returncode == 1, text[-3000:]
        error = text.strip().splitlines()[-1]
        assert error.startswith("synthvit generate: error: cannot ") and "s3://synthvit/away/" in error, error
        assert "did not answer" in error and "AWS_ENDPOINT_URL" in error and "Traceback" not in text
    finally:
        s3.start()
    res = run_cli("generate", *tiny_overrides(url, **KILL_RUN), check=True)
    assert "resuming" in res.stderr
    got = objects(s3, "away")
    assert {k: got[k] for k in dataset_bytes(kill_run_local)} == dataset_bytes(kill_run_local)
    assert_no_secret(s3.secret_key, tmp_path, res.stderr)


def test_a_corrupted_object_is_reported_by_verify_and_skipped_by_pretrain(s3, tiny_dataset, cli):
    url = upload(s3, tiny_dataset, "corrupt")
    fs = s3.filesystem()
    victim = f"{s3.bucket}/corrupt/synthvit-000002.tar"
    fs.pipe_file(victim, fs.cat_file(victim)[:3000])  # truncated mid-sample
    assert_cli_error(cli("generate", f"out_dir={url}", "verify=true"), 1,
                     "synthvit-000002.tar: sha256 differs from the manifest", url)
    batches = take(spec_for(url, resample=False, workers=1, batches_per_epoch=20), 0, 20)
    assert len(batches) == 20 and batches[-1]["skipped"][1] >= 1
    assert {k.split("/")[0] for b in batches for k in b["keys"]} >= {"synthvit-000000.tar", "synthvit-000004.tar"}


def test_a_dropped_read_is_retried_from_where_it_stopped_then_skipped(s3, tiny_dataset, monkeypatch, caplog):
    from synthvit import storage

    url = upload(s3, tiny_dataset, "flaky")
    real, calls = storage.RetryingReader._read, []

    def flaky(self, n):  # every third read drops the connection once
        calls.append(n)
        if len(calls) % 3 == 1:
            raise ConnectionResetError("connection reset by peer")
        return real(self, n)
    monkeypatch.setattr(storage.RetryingReader, "_read", flaky)
    with open_stream(f"{url}/synthvit-000001.tar", buffer=4096) as f:
        assert f.read() == (tiny_dataset / "synthvit-000001.tar").read_bytes()
    assert "retry 1 of 2" in caplog.text

    def down(self, n):
        raise TimeoutError("timed out")
    monkeypatch.setattr(storage.RetryingReader, "_read", down)
    with pytest.raises(StorageError, match=f"cannot read {url}/synthvit-000001.tar: the object store did not"):
        open_stream(f"{url}/synthvit-000001.tar").read()
    skipped = SkipCounter()  # the training stream's handler: the shard is skipped and counted, the stream goes on
    shards = [{"url": f"{url}/synthvit-00000{i}.tar"} for i in (1, 2)]
    assert list(tar_samples(skipped)(iter(shards))) == [] and skipped.count == 2


@pytest.mark.slow
def test_two_ranks_pretrain_from_the_bucket_see_the_batches_of_a_local_copy(s3, tiny_dataset, tmp_path):
    url = upload(s3, tiny_dataset, "ddp")
    runs = {}
    for name, data in (("local", tiny_dataset), ("s3", url)):
        out = tmp_path / name
        proc = accelerate_launch("pretrain", f"data=[{data}]", f"out_dir={out}", *TINY_PRETRAIN, "steps=6",
                                 "num_workers=1", "record_keys=true", "save_every=6")
        runs[name] = out
        assert_no_secret(s3.secret_key, proc.stdout, proc.stderr)
    for rank in (0, 1):
        keys = [(runs[n] / f"keys_rank{rank}.txt").read_text() for n in ("local", "s3")]
        assert keys[0] == keys[1] and len(keys[0].splitlines()) == 6
    losses = [[json.loads(ln)["loss"] for ln in (runs[n] / "metrics.jsonl").read_text().splitlines()]
              for n in ("local", "s3")]
    assert losses[0] == losses[1] and losses[0]
    assert f"- {url}" in (runs["s3"] / "config.yaml").read_text()
    assert_no_secret(s3.secret_key, tmp_path)


def test_finetune_reads_shards_from_the_bucket_as_from_a_folder(s3, tiny_dataset):
    from synthvit.data import DataError, load_real_data

    url = upload(s3, tiny_dataset, "finetune")
    local, remote = load_real_data(tiny_dataset), load_real_data(url)
    assert remote.fmt == "shards" and remote.seg_classes == local.seg_classes
    assert [(i.id, i.label) for i in remote.items] == [(i.id, i.label) for i in local.items]
    assert remote.items[3].source == f"{url}/synthvit-000000.tar#00000003"
    with pytest.raises(DataError, match="a URL holds synthvit shards"):
        load_real_data(url, fmt="canonical")


@pytest.mark.slow
def test_two_ranks_generate_into_one_bucket_the_single_process_bytes(s3, tiny_dataset):
    url = s3.url("ranks")
    proc = accelerate_launch("generate", *tiny_overrides(url))
    assert "rank 1: 16 new samples" in proc.stderr  # shards 1 and 3 of 5 belong to rank 1
    got, want = objects(s3, "ranks"), dataset_bytes(tiny_dataset)
    assert {k: got[k] for k in want} == want  # _info.json holds every shard's sha256, read back from the bucket
    assert verify_dataset(url) == []
    assert_no_secret(s3.secret_key, proc.stdout, proc.stderr)

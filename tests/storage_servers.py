"""Real storage servers on 127.0.0.1 for the storage tests: moto (S3), a GCS emulator, HTTP.

Each runs as a subprocess on a free port and logs every request to a file, so
a test can count the GETs of one object (the proof that a restart or a second
replica did not download again).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

BUCKET = "kiln-models"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port() -> int:
    """A port nothing listens on (taken and released at once)."""
    return free_port()


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text(errors='replace')}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text(errors='replace')}")


class Server:
    """A server subprocess with its request log."""

    def __init__(self, args: list[str], log: Path, ready_path: str, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - closed in stop()
        argv = [a.replace("{port}", str(self.port)) for a in args]
        self.proc = subprocess.Popen(
            argv, stdout=self._out, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
        _wait_http(self.url + ready_path, self.proc, log)

    def requests(self, method: str, path: str) -> int:
        """How many `METHOD path` requests the server has logged (query strings ignored)."""
        self._out.flush()
        pattern = re.compile(rf'"{method} {re.escape(path)}(\?[^ ]*)? HTTP/1\.[01]"')
        return len(pattern.findall(self.log.read_text(errors="replace")))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._out.close()


class S3Server(Server):
    """moto's standalone server with IAM checks on: only the key it issued is accepted.

    The first three requests (create a user, give it a key, allow it s3:*) run
    before authentication starts (moto's INITIAL_NO_AUTH_ACTION_COUNT).
    """

    def __init__(self, log: Path) -> None:
        super().__init__(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "{port}"],
            log,
            "/moto-api/",
            {"INITIAL_NO_AUTH_ACTION_COUNT": "3"},
        )
        import boto3

        iam = boto3.client("iam", **self._client_args("setup", "setup"))
        iam.create_user(UserName="kiln")
        key = iam.create_access_key(UserName="kiln")["AccessKey"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="kiln", PolicyName="s3", PolicyDocument=json.dumps(policy))
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        self.s3 = boto3.client("s3", **self._client_args(self.key_id, self.secret))
        self.s3.create_bucket(Bucket=BUCKET)

    def _client_args(self, key_id: str, secret: str) -> dict[str, str]:
        return {
            "endpoint_url": self.url,
            "aws_access_key_id": key_id,
            "aws_secret_access_key": secret,
            "region_name": "us-east-1",
        }

    def put(self, key: str, data: bytes) -> str:
        self.s3.put_object(Bucket=BUCKET, Key=key, Body=data)
        return f"s3://{BUCKET}/{key}"

    def gets(self, key: str) -> int:
        return self.requests("GET", f"/{BUCKET}/{key}")

    def env(self, **overrides: str) -> dict[str, str]:
        """The environment a Kiln process needs to read from this server (and nothing else)."""
        env = {
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.url,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        return {**env, **overrides}


class GcsServer(Server):
    """PyPI's gcp-storage-emulator (JSON API), in memory."""

    def __init__(self, log: Path) -> None:
        exe = Path(sys.executable).with_name("gcp-storage-emulator")
        super().__init__(
            [str(exe), "start", "--host", "127.0.0.1", "--port", "{port}", "--in-memory"],
            log,
            "/",
            {},
        )
        os.environ["STORAGE_EMULATOR_HOST"] = self.url  # the gcsfs client below reads it
        try:
            from gcsfs.core import GCSFileSystem

            self.fs = GCSFileSystem(token="anon", skip_instance_cache=True)
            self.fs.mkdir(BUCKET)
        finally:
            del os.environ["STORAGE_EMULATOR_HOST"]

    def put(self, key: str, data: bytes) -> str:
        self.fs.pipe_file(f"{BUCKET}/{key}", data)
        return f"gs://{BUCKET}/{key}"


class HttpServer(Server):
    """`python -m http.server` over a folder."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        super().__init__(
            [sys.executable, "-m", "http.server", "{port}", "-b", "127.0.0.1", "-d", str(root)],
            log,
            "/",
            {},
        )

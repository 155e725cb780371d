"""A real S3 server for the tests and the object-storage benchmark: moto's standalone server on
127.0.0.1, in its own process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from genctr_rec.distributed import free_port

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def s3_server(log: Path, check_keys: bool = False) -> Iterator[dict[str, str]]:
    """Start ``moto.server`` on a free loopback port; yields the environment that points the
    AWS clients (s3fs, boto) at it. Stopped on exit. ``check_keys``: the server authenticates
    every request (moto accepts any key otherwise), so a key it does not know is refused."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if check_keys else {})},
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except urllib.error.HTTPError:  # answering (with auth on, even this is refused)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.2)
        yield {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint}
    finally:
        server.terminate()
        server.wait(timeout=30)


def make_bucket(name: str) -> None:
    import fsspec

    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(name)


def upload(local: Path, url: str) -> None:
    """Copy a local directory to ``url`` (every file, same relative names)."""
    from genctr_rec.storage import copy_tree, location

    copy_tree(local, location(url))


def env_with(server_env: dict[str, str], **extra: str) -> dict[str, str]:
    return {**os.environ, **server_env, **extra}

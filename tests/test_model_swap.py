"""A service that changes model without a pause: versions, pinning, checks before a swap, and a
soak of 8 clients across five swaps and a damaged version (serving/versions.py, swap.py)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from genctr_rec.checkpoint import write_manifest
from genctr_rec.cli import main
from genctr_rec.serving.asgi import VERSION_HEADER
from genctr_rec.serving.config import ServeConfig
from genctr_rec.serving.exported import PACKAGE_FILE
from genctr_rec.serving.predictor import Predictor
from genctr_rec.serving.server import create_app
from genctr_rec.serving.swap import watch
from genctr_rec.serving.versions import PIN_FILE, ModelSource, version_key
from tests.serving import as_request, score_body, start_server, stop_server


def publish(
    artifact: Path, models: Path, version: str, spoil: Callable[[Path], None] | None = None
) -> Path:
    """Copy an artifact in as ``version`` the way an export does: whole, by one rename.
    ``spoil`` damages the copy before it appears (a server polling the folder must never see
    the intact version in between, or it would rightly serve it)."""
    staging = models / f".{version}.tmp"
    shutil.copytree(artifact, staging)
    if spoil is not None:
        spoil(staging)
    os.replace(staging, models / version)
    return models / version


def damage_bytes(version_dir: Path) -> None:
    """A file changed after its manifest was written (a bad copy, a bit flip)."""
    model = version_dir / PACKAGE_FILE
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))


def poison_weights(version_dir: Path) -> None:
    """A consistent artifact (manifest matches) whose model answers NaN: only the probe
    requests catch it. Its exported programs' weights are set to NaN and packaged again
    (uncompiled); the metadata and manifest are written to match."""
    from torch.export.pt2_archive._package import load_pt2, package_pt2

    programs = load_pt2(version_dir / PACKAGE_FILE).exported_programs
    with torch.no_grad():
        for program in programs.values():
            for value in program.state_dict.values():
                if value.is_floating_point():
                    value.fill_(float("nan"))
    (version_dir / PACKAGE_FILE).unlink()
    package_pt2(version_dir / PACKAGE_FILE, exported_programs=programs)
    meta = json.loads((version_dir / "artifact.json").read_text())
    meta["model"].update(compiled="none", vector_isa=None)
    (version_dir / "artifact.json").write_text(json.dumps(meta))
    (version_dir / "manifest.json").unlink()
    write_manifest(version_dir)


def test_versions_sort_naturally_and_ignore_incomplete_ones(tmp_path: Path, artifacts) -> None:
    assert sorted(["v10", "v9", "v1"], key=version_key) == ["v1", "v9", "v10"]
    assert sorted(["2026-12-07", "2026-12-06"], key=version_key)[0] == "2026-12-06"
    models = tmp_path / "models"
    models.mkdir()
    fp32 = artifacts["genctr-none"]["path"]
    publish(fp32, models, "v9")
    publish(fp32, models, "v10")
    (models / "v11").mkdir()  # an export still writing (no manifest yet)
    shutil.copytree(fp32, models / ".hidden")
    source = ModelSource(str(models))
    assert source.versioned and source.versions() == ["v9", "v10"]
    assert source.target() == "v10"
    assert not ModelSource(str(fp32)).versioned


def test_pin_is_checked_and_rolls_back_every_server(tmp_path: Path, artifacts, capsys) -> None:
    models = tmp_path / "models"
    models.mkdir()
    publish(artifacts["genctr-none"]["path"], models, "v1")
    publish(artifacts["genctr-int8"]["path"], models, "v2")
    publish(artifacts["genctr-none"]["path"], models, "v3", damage_bytes)
    assert main(["models", "pin", str(models), "v1"]) == 0
    assert json.loads(capsys.readouterr().out)["serving"] == "v1"
    assert ModelSource(str(models)).target() == "v1"
    assert main(["models", "pin", str(models), "v3"]) == 2  # damaged: refused, pin unchanged
    assert "damaged artifact" in capsys.readouterr().err
    assert main(["models", "pin", str(models), "v7"]) == 2
    assert "no complete version 'v7'" in capsys.readouterr().err
    assert (models / PIN_FILE).read_text().strip() == "v1"
    assert main(["models", "unpin", str(models)]) == 0
    assert json.loads(capsys.readouterr().out)["serving"] == "v3"  # newest; servers refuse it


def test_watcher_swaps_checked_versions_and_refuses_bad_ones(tmp_path: Path, artifacts) -> None:
    """A damaged (manifest) and a poisoned (NaN) version are refused and counted, the current
    one keeps serving; an exported-again version is tried again; a start skips a bad newest."""
    models = tmp_path / "models"
    models.mkdir()
    fp32, int8 = artifacts["genctr-none"]["path"], artifacts["genctr-int8"]["path"]
    publish(fp32, models, "v1")
    watcher = watch(str(models), {}, poll_s=30.0, warm_up_rounds=1)
    app = create_app(watcher, ServeConfig(warm_up_rounds=0))
    assert watcher.current.version == "v1"

    async def check() -> bool:
        return await watcher.check()

    assert not asyncio.run(check())  # nothing new
    publish(int8, models, "v2")
    assert asyncio.run(check()) and watcher.current.version == "v2" and watcher.swaps == 1
    publish(fp32, models, "v3", damage_bytes)
    assert not asyncio.run(check()) and watcher.current.version == "v2"
    assert "damaged artifact" in watcher.refused["v3"]
    assert not asyncio.run(check())  # not tried again while unchanged
    shutil.rmtree(models / "v3")
    publish(int8, models, "v3")  # exported again (a new manifest)
    assert asyncio.run(check()) and watcher.current.version == "v3" and "v3" not in watcher.refused
    publish(fp32, models, "v4", poison_weights)
    assert not asyncio.run(check()) and watcher.current.version == "v3"
    assert "probe scores are not probabilities" in watcher.refused["v4"]
    text = app.metrics.render()[0].decode()  # what GET /metrics answers
    assert 'genctr_model_refusals_total{version="v4"} 1.0' in text
    assert "genctr_model_swaps_total 2.0" in text
    assert 'genctr_model_version{version="v3"} 1.0' in text
    # a fresh start with the poisoned v4 newest serves v3: it loads, v4 does not
    damage_bytes(models / "v4")
    restarted = watch(str(models), {}, poll_s=30.0, warm_up_rounds=1)
    assert restarted.current.version == "v3" and "v4" in restarted.refused


def _expected(path: Path, pool: list[dict]) -> list[np.ndarray]:
    predictor = Predictor(path)
    return [predictor.score(as_request(b)) for b in pool]


@pytest.mark.slow
def test_soak_across_five_swaps_and_a_damaged_version(tmp_path: Path, artifacts) -> None:
    """8 clients keep scoring while versions arrive every ~1.5 s (four new ones, alternating
    fp32 and int8 models, a damaged one among them), then a rollback by pin: five swaps, zero
    failed requests, every answer's scores exactly those of the version its header names, the
    damaged version never answers, /metrics counts 5 swaps and 1 refusal."""
    models = tmp_path / "models"
    models.mkdir()
    fp32, int8 = artifacts["genctr-none"]["path"], artifacts["genctr-int8"]["path"]
    publish(fp32, models, "v01")
    rng = np.random.default_rng(5)
    pool = [
        score_body(rng, int(h), int(c))
        for h, c in zip(rng.integers(0, 60, 24), rng.integers(1, 30, 24), strict=True)
    ]
    expected = {"fp32": _expected(fp32, pool), "int8": _expected(int8, pool)}
    kind = {"v01": "fp32"}
    proc, url = start_server(models, "--poll-s", "0.2", "--workers", "1")
    stop = threading.Event()
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def client(seed: int) -> int:
        local = np.random.default_rng(seed)
        failures = 0
        with httpx.Client(base_url=url, timeout=30) as http:
            while not stop.is_set():
                i = int(local.integers(0, len(pool)))
                reply = http.post("/score", json=pool[i])
                version = reply.headers.get(VERSION_HEADER)
                ok = (
                    reply.status_code == 200
                    and version in kind
                    and np.allclose(reply.json()["scores"], expected[kind[version]][i], atol=1e-6)
                )
                failures += not ok
                with lock:
                    seen[version] = seen.get(version, 0) + 1
        return failures

    try:
        with ThreadPoolExecutor(8) as pool_threads:
            futures = [pool_threads.submit(client, s) for s in range(8)]
            schedule = [("v02", int8), ("v03", fp32), ("v04", None), ("v05", int8), ("v06", fp32)]
            for version, artifact in schedule:
                time.sleep(1.5)
                if artifact is None:  # damaged: must never serve
                    publish(fp32, models, version, damage_bytes)
                    continue
                kind[version] = "int8" if artifact == int8 else "fp32"
                publish(artifact, models, version)
                _wait_for_version(url, version)
            subprocess.run(
                [sys.executable, "-m", "genctr_rec.cli", "models", "pin", str(models), "v02"],
                check=True, capture_output=True,
            )  # fmt: skip
            _wait_for_version(url, "v02")
            time.sleep(1.0)
            stop.set()
            failures = sum(f.result() for f in futures)
        metrics = httpx.get(f"{url}/metrics").text
        meta = httpx.get(f"{url}/metadata").json()
    finally:
        stop.set()
        stop_server(proc)
    assert failures == 0
    assert "v04" not in seen and None not in seen
    assert {"v01", "v02", "v03", "v05", "v06"} <= set(seen)
    assert "genctr_model_swaps_total 5.0" in metrics  # four new versions and the rollback
    assert 'genctr_model_refusals_total{version="v04"} 1.0' in metrics
    assert meta["version"] == "v02" and meta["models"]["pinned"] == "v02"
    assert "damaged artifact" in meta["models"]["refused"]["v04"]


def _wait_for_version(url: str, version: str, timeout_s: float = 60.0) -> None:
    deadline = time.time() + timeout_s
    while httpx.get(f"{url}/metadata").json()["version"] != version:
        if time.time() > deadline:
            pytest.fail(f"the server never swapped to {version}")
        time.sleep(0.05)

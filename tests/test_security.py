"""Holes a hostile bucket, request or scheduler could open, each shown closed: downloads that
stay in their folder, checkpoints that run no code and survive a kill mid-save, collectives on
the group's device, locks without a window, shared caches that never break each other, and the
small ones (prefix-only buckets, readable outputs, unverified checkpoints, per-rank hashing).
The service's limits, timeouts and token are in ``test_service_hardening.py``."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import genctr_rec.checkpoint as checkpoint
from benchmarks.s3_server import make_bucket, s3_server, upload
from genctr_rec.checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointManager,
    load_model,
    save_model,
    verify_manifest,
    write_manifest,
)
from genctr_rec.serving import ArtifactError
from genctr_rec.serving.artifact import artifact_digest, fetch_artifact, load_artifact
from genctr_rec.storage import location, safe_relative
from genctr_rec.training.rundir import LOCK_FILE, LockOwner, RunDirError, RunLock
from tests.distributed import run_ranks

BUCKET = "genctr-security"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    log = tmp_path_factory.mktemp("moto") / "server.log"
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # clients of an earlier module's server
    with s3_server(log) as env, pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        make_bucket(BUCKET)
        yield env
    s3fs.S3FileSystem.clear_instance_cache()


def _boto(env: dict[str, str]):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")


# 1. downloads stay in their folder ----------------------------------------------------------


def test_names_that_leave_their_folder_are_refused() -> None:
    for bad in ("../x", "/etc/passwd", "a//b", "a/../../b", "./a", "", "a\\b", "x/.."):
        with pytest.raises(ValueError):
            safe_relative(bad)
    assert safe_relative("a/b.npy") == "a/b.npy"


def test_a_hostile_bucket_cannot_write_outside_the_cache(
    s3, artifacts, tmp_path, monkeypatch
) -> None:
    """Objects under the artifact's prefix that the manifest does not list (one named to climb
    out of the staging folder) are never fetched; a manifest naming a file outside the artifact
    is refused before any download."""
    monkeypatch.setenv("GENCTR_CACHE", str(tmp_path / "cache"))
    local = artifacts["genctr-none"]["path"]
    url = f"s3://{BUCKET}/hostile"
    upload(local, url)
    client = _boto(s3)
    client.put_object(Bucket=BUCKET, Key="hostile/../../escaped.txt", Body=b"owned")
    client.put_object(Bucket=BUCKET, Key="hostile/extra/unlisted.bin", Body=b"x" * 100)
    cached = fetch_artifact(url)
    listed = set(json.loads((local / MANIFEST).read_text())["files"]) | {MANIFEST}
    got = {p.relative_to(cached).as_posix() for p in cached.rglob("*") if p.is_file()}
    assert got == listed
    assert not list((tmp_path).rglob("escaped.txt"))
    # a manifest naming a file outside the artifact
    manifest = json.loads((local / MANIFEST).read_text())
    manifest["files"]["../../escaped.txt"] = {"bytes": 5, "sha256": "0" * 64}
    client.put_object(Bucket=BUCKET, Key="hostile/manifest.json", Body=json.dumps(manifest))
    with pytest.raises(ArtifactError, match="outside the artifact"):
        fetch_artifact(url)
    assert not list((tmp_path).rglob("escaped.txt"))


def test_a_local_manifest_naming_a_file_outside_is_refused(artifacts, tmp_path) -> None:
    copy = tmp_path / "art"
    shutil.copytree(artifacts["genctr-none"]["path"], copy)
    (tmp_path / "secret").write_text("x")
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["files"]["../secret"] = {"bytes": 1, "sha256": "0" * 64}
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="not a plain relative file name"):
        verify_manifest(copy)


# 3. what a reader must trust ------------------------------------------------------------------


class _Payload:
    """Unpickling this runs ``touch SENTINEL``: what a hostile RNG file could do."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_a_checkpoint_rng_file_runs_no_code(tmp_path, caplog) -> None:
    """An RNG state file replaced by a pickle that runs a command (and the manifest rewritten
    to match, as whoever controls the bucket could): resuming does not run it; the random
    streams restart with a warning. A state written by this version is restored."""
    manager = CheckpointManager(tmp_path / "run")
    model = nn.Linear(3, 2)
    rng = {"torch": torch.get_rng_state(), "python": {"state": torch.arange(4)}}
    path = manager.save(3, {"model": model.state_dict()}, {"step": 3, "world_size": 1}, rng)
    _, restored = manager.load(path, {"model": nn.Linear(3, 2).state_dict()})
    assert torch.equal(restored["python"]["state"], torch.arange(4))
    sentinel = tmp_path / "pwned"
    torch.save({"x": _Payload(sentinel)}, path / "rng-rank0.pt")
    (path / MANIFEST).unlink()
    write_manifest(path)
    progress, restored = manager.load(path, {"model": nn.Linear(3, 2).state_dict()})
    assert not sentinel.exists(), "unpickling the RNG file ran its command"
    assert restored is None and progress["step"] == 3
    assert "not unpickled" in caplog.text


def test_an_artifact_pinned_by_digest_is_the_only_one_loaded(artifacts, tmp_path) -> None:
    path = artifacts["genctr-none"]["path"]
    digest = artifact_digest(path)
    assert artifacts["genctr-none"]["meta"]["artifact_sha256"] == digest
    assert load_artifact(path, digest).path == path
    with pytest.raises(ArtifactError, match="not the pinned"):
        load_artifact(artifacts["genctr-int8"]["path"], digest)


# 4. collectives on the group's device ---------------------------------------------------------


def test_the_checkpoint_collective_uses_the_groups_device(monkeypatch) -> None:
    """nccl reduces CUDA tensors only: the all-ok flag is built on the device the backend
    needs (checked on CPU by asking for the nccl device and recording what is reduced)."""
    assert checkpoint.collective_device("nccl").type == "cuda"
    assert checkpoint.collective_device("gloo").type == "cpu"
    seen: list[torch.device] = []
    monkeypatch.setattr(checkpoint.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(checkpoint.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(checkpoint, "collective_device", lambda backend: torch.device("meta"))
    monkeypatch.setattr(checkpoint.dist, "all_reduce", lambda t: seen.append(t.device))
    with pytest.raises((NotImplementedError, RuntimeError)):  # a meta tensor has no value
        checkpoint._all_ok(True)
    assert seen == [torch.device("meta")]


# 5. the run lock --------------------------------------------------------------------------------


def _slow_acquire(run: str, delay: float, results) -> None:
    """Acquire the lock of ``run`` with every file write slowed down (a busy disk)."""
    import genctr_rec.training.rundir as rundir

    real = os.fdopen

    def slow(*args, **kwargs):
        handle = real(*args, **kwargs)
        time.sleep(0.4)
        return handle

    rundir.os.fdopen = slow
    time.sleep(delay)
    try:
        RunLock(Path(run)).acquire()
        results.put("held")
        time.sleep(1.5)
    except RunDirError:
        results.put("refused")


def test_two_jobs_racing_for_a_lock_never_both_hold_it(tmp_path) -> None:
    """The second job reads the lock while the first is still writing it: it must see either
    nothing (and lose the race to link its own) or the first's whole record; never an empty
    file it would take for a dead writer's."""
    run = tmp_path / "run"
    run.mkdir()
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    jobs = [
        context.Process(target=_slow_acquire, args=(str(run), delay, results))
        for delay in (0.0, 0.15)
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=30)
    outcomes = sorted(results.get(timeout=5) for _ in jobs)
    assert outcomes == ["held", "refused"]


def test_static_rendezvous_is_not_a_job_id(tmp_path, monkeypatch) -> None:
    """torchrun's static rendezvous sets TORCHELASTIC_RUN_ID=none for every job: a live job's
    lock is not taken over by another job that merely shares that value."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = tmp_path / "run"
        run.mkdir()
        holder = LockOwner("elsewhere", other.pid, None, "none", "2026-01-01T00:00:00+00:00")
        (run / LOCK_FILE).write_text(json.dumps(holder.__dict__))
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
        assert LockOwner.me().job is None
        with pytest.raises(RunDirError, match="is in use by"):
            RunLock(run).acquire()
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "f00d")  # a real job id still matches itself
        assert LockOwner.me().job == "f00d"
    finally:
        other.kill()
        other.wait()


# 6. a kill while a step is saved again -----------------------------------------------------------


def test_a_kill_while_a_step_is_saved_again_keeps_a_complete_copy(tmp_path, monkeypatch) -> None:
    """The same step saved twice (a resume that stops where it started): killed after the old
    copy is set aside and before the new one takes its name, the next resume finds the step
    whole (with keep 1 there is no other checkpoint to fall back to)."""
    manager = CheckpointManager(tmp_path / "run", keep=1)
    model = nn.Linear(4, 2)
    progress = {"step": 7, "world_size": 1}
    manager.save(7, {"model": model.state_dict()}, progress, {})
    with torch.no_grad():
        model.weight.add_(1.0)
    real = os.replace

    def killed(src, dst):
        if Path(src).name.endswith(".tmp"):  # the new copy would take the step's name
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        manager.save(7, {"model": model.state_dict()}, progress, {})
    monkeypatch.undo()
    assert not (manager.root / "step-000000007").exists()  # the name is empty at the kill
    chosen = CheckpointManager(tmp_path / "run", keep=1).newest_valid()
    assert chosen is not None and chosen.name == "step-000000007"
    state = {"model": nn.Linear(4, 2).state_dict()}
    manager.load(chosen, state)
    assert torch.equal(state["model"]["weight"], model.weight)  # the newer complete copy


def test_a_kill_while_the_best_model_is_replaced_keeps_one(tmp_path, monkeypatch) -> None:
    path = tmp_path / "best"
    model = nn.Linear(4, 2)
    save_model(model, path)
    first = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    real = os.replace
    calls = []

    def killed(src, dst):
        if Path(src).name.startswith("best"):  # not the manifest's own temporary file
            calls.append(Path(src).name)
            if len(calls) == 2:  # after "best" -> "best.old", before "best.tmp" -> "best"
                raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, path)
    monkeypatch.undo()
    assert not path.exists()
    fresh = nn.Linear(4, 2)
    load_model(fresh, path)  # recovered: the complete new copy
    assert torch.equal(fresh.weight, model.weight) and not torch.equal(fresh.weight, first)


# 7. servers sharing a cache ---------------------------------------------------------------------


def _fetch(url: str, cache: str, env: dict[str, str]) -> str:
    os.environ.update(env)
    os.environ["GENCTR_CACHE"] = cache
    return str(fetch_artifact(url))


def test_servers_sharing_a_cache_never_break_each_other(s3, artifacts, tmp_path) -> None:
    """Four processes fetch one artifact into one cache at once: one folder, whole; the
    artifact replaced in the bucket lands in a new folder while the old one stays intact for
    whoever still reads it; another endpoint with the same URL is another folder."""
    url = f"s3://{BUCKET}/shared"
    upload(artifacts["genctr-none"]["path"], url)
    cache = str(tmp_path / "cache")
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        paths = pool.starmap(_fetch, [(url, cache, s3)] * 4)
    assert len(set(paths)) == 1
    first = Path(paths[0])
    verify_manifest(first)
    before = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    from genctr_rec.storage import remove_tree

    remove_tree(location(url))
    upload(artifacts["genctr-int8"]["path"], url)
    second = Path(_fetch(url, cache, s3))
    assert second != first
    verify_manifest(second)
    verify_manifest(first)  # untouched for a server still reading it
    assert {p.name: p.stat().st_mtime_ns for p in first.iterdir()} == before
    elsewhere = {**s3, "AWS_ENDPOINT_URL": s3["AWS_ENDPOINT_URL"] + "/"}
    assert Path(_fetch(url, cache, elsewhere)) not in (first, second)


# 9. the smaller ones ----------------------------------------------------------------------------


def test_a_prefix_only_credential_can_reach_its_prefix(s3, monkeypatch) -> None:
    """Under an IAM policy that allows listing only below a prefix, the reachability check
    lists the prefix, never the bucket's root."""
    import s3fs

    from genctr_rec.storage import check_reachable

    real = s3fs.S3FileSystem.ls

    def prefix_only(self, path, *args, **kwargs):
        if path.strip("/") == BUCKET:
            raise PermissionError("AccessDenied: ListObjectsV2 on the bucket root")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "ls", prefix_only)
    check_reachable(f"s3://{BUCKET}/team-a/data")
    with pytest.raises(Exception, match="bucket does not exist"):
        check_reachable("s3://no-such-bucket-here/x")


def test_outputs_are_readable_by_other_users(tmp_path) -> None:
    """Datasets, artifacts and small files come out with the permissions the umask gives any
    new file (0755 / 0644 under 022), not mkdtemp's 0700 or mkstemp's 0600."""
    from genctr_rec.storage import publish, write_bytes

    old = os.umask(0o022)
    try:
        with publish(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("x")
        write_bytes(tmp_path / "note.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "out" / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "note.json").stat().st_mode) == 0o644


def test_a_local_checkpoint_without_manifest_is_not_read(tmp_path) -> None:
    save_model(nn.Linear(2, 2), tmp_path / "ck")
    (tmp_path / "ck" / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        load_model(nn.Linear(2, 2), tmp_path / "ck")


def _hash_own_files(rank: int, world: int, root: str) -> list[str]:
    """Every rank saves; returns the files this rank hashed for the manifest."""
    hashed: list[str] = []
    real = checkpoint.sha256

    def recording(path):
        hashed.append(path.name)
        return real(path)

    checkpoint.sha256 = recording
    manager = CheckpointManager(Path(root))
    model = nn.Linear(8, 4)
    manager.save(1, {"model": model.state_dict()}, {"step": 1, "world_size": world}, {})
    return hashed


@pytest.mark.slow
def test_every_rank_hashes_the_files_it_wrote(tmp_path) -> None:
    hashed = run_ranks(_hash_own_files, 2, str(tmp_path / "run"))
    assert any(name.startswith("__1_") for name in hashed[1]), hashed
    assert all(not name.startswith("__0_") for name in hashed[1]), hashed
    assert "rng-rank1.pt" in hashed[1] and "rng-rank1.pt" not in hashed[0]
    step = tmp_path / "run" / "checkpoints" / "step-000000001"
    verify_manifest(step)
    listed = set(json.loads((step / MANIFEST).read_text())["files"])
    assert listed == {p.name for p in step.iterdir() if p.name != MANIFEST}


def test_tensorboard_staging_is_removed_after_upload(s3, tmp_path, monkeypatch) -> None:
    from genctr_rec.distributed import DistContext
    from genctr_rec.training.tracking import tensorboard_writer

    monkeypatch.setenv("GENCTR_CACHE", str(tmp_path / "cache"))
    ctx = DistContext(0, 1, 0, 1, torch.device("cpu"), "gloo")
    run = location(f"s3://{BUCKET}/tb-run")
    writer = tensorboard_writer(run, ctx)
    writer.add_scalar("x", 1.0, 0)
    writer.close()
    assert list((run / "tensorboard").iterdir())
    staged = tmp_path / "cache" / "tensorboard"
    assert not any(p.is_file() for p in staged.rglob("*")), list(staged.rglob("*"))


def test_rng_state_is_only_tensors_and_numbers() -> None:
    """What resume restores loads with torch.load(weights_only=True) and continues every
    stream exactly."""
    import io
    import random

    from genctr_rec.training.rng import restore_rng, rng_state

    g = torch.Generator().manual_seed(3)
    random.seed(1)
    np.random.seed(2)
    np.random.normal()  # a cached Gaussian in numpy's state
    buffer = io.BytesIO()
    torch.save(rng_state({"g": g}), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    first = (random.random(), np.random.normal(), torch.rand(1).item(), torch.rand(1, generator=g))
    random.seed(9)
    np.random.seed(9)
    restore_rng(state, {"g": g})
    again = (random.random(), np.random.normal(), torch.rand(1).item(), torch.rand(1, generator=g))
    assert first[:3] == again[:3] and torch.equal(first[3], again[3])

"""Object storage end to end, against a real S3 server (moto's, on 127.0.0.1, started here):
data read from a bucket, a two-rank pre-training checkpointing into it and resuming from it
after a SIGKILL, fine-tuning from it, export to it, serving from it, interrupted saves, and
one-line errors for wrong keys, a missing bucket or an unreachable store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.s3_server import make_bucket, s3_server, upload
from genctr_rec.checkpoint import MANIFEST, CheckpointManager
from genctr_rec.data.reader import ImpressionReader
from genctr_rec.data.schema import DataFormatError
from genctr_rec.data.validate import validate_dataset
from genctr_rec.distributed import free_port
from genctr_rec.serving.predictor import Predictor
from genctr_rec.storage import location
from tests.distributed import kill_a_rank_once
from tests.serving import as_request, score_body, start_server, stop_server

BUCKET = "genctr-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory, toy_synth: Path) -> Iterator[dict[str, str]]:
    """The server's environment, set in this process too; the toy dataset at s3://BUCKET/toy."""
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with s3_server(log) as env, pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        patch.setenv("GENCTR_CACHE", str(tmp_path_factory.mktemp("cache")))
        make_bucket(BUCKET)
        upload(toy_synth, f"s3://{BUCKET}/toy")
        yield env


def _env(**extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",  # c10d rendezvous restarts (see test_checkpoint)
        **extra,
    }


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "genctr_rec.cli", *args],
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _torchrun(*args: str, restarts: int = 0) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--max-restarts", str(restarts), "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"localhost:{free_port()}", "-m", "genctr_rec.cli", *args,
    ]  # fmt: skip


def test_a_dataset_in_a_bucket_reads_as_on_disk(s3, toy_synth: Path) -> None:
    """validate gives the same report; the reader gives the same batches to the same rank,
    and resumes mid-epoch at the same row."""
    url = f"s3://{BUCKET}/toy"
    local_report, remote_report = validate_dataset(toy_synth), validate_dataset(url)
    assert remote_report == local_report

    def batches(data, state=None, limit=None):
        reader = ImpressionReader(data, "train", 64, rank=1, world_size=2, seed=5, shuffle=True)
        reader.set_epoch(1)
        if state is not None:
            reader.load_state_dict(state)
        out = []
        for batch in reader:
            out.append(batch.labels.numpy().copy())
            if limit is not None and len(out) == limit:
                return out, reader.state_dict()
        return out, reader.state_dict()

    whole_local, _ = batches(toy_synth)
    first, state = batches(url, limit=3)
    rest, _ = batches(url, state=state)
    assert len(first + rest) == len(whole_local)
    for a, b in zip(whole_local, first + rest, strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_data_in_a_bucket_names_the_object(s3, small_dataset: Path) -> None:
    (small_dataset / "items.parquet").write_bytes(b"not parquet at all")
    upload(small_dataset, f"s3://{BUCKET}/broken")
    with pytest.raises(DataFormatError, match=rf"s3://{BUCKET}/broken/items.parquet"):
        validate_dataset(f"s3://{BUCKET}/broken")


def test_an_interrupted_save_leaves_the_previous_checkpoint(s3, monkeypatch) -> None:
    """Object storage has no rename: a save killed before its manifest leaves only its staged
    copy (``step-N.next``), which is not a checkpoint; resume takes the previous one."""
    import genctr_rec.checkpoint as checkpoint

    run = f"s3://{BUCKET}/interrupted"
    manager = CheckpointManager(run, keep=3)
    model = nn.Linear(4, 3)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    manager.save(1, {"model": model.state_dict()}, {"step": 1, "world_size": 1}, {"r": 1})
    with torch.no_grad():
        model.weight.add_(1.0)

    def killed(directory):  # the job dies after the shards, before the manifest
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        manager.save(2, {"model": model.state_dict()}, {"step": 2, "world_size": 1}, {"r": 2})
    monkeypatch.undo()
    step2 = location(run) / "checkpoints" / "step-000000002"
    staged = location(run) / "checkpoints" / "step-000000002.next"
    assert (staged / ".metadata").is_file() and not (staged / MANIFEST).is_file()
    assert not (step2 / MANIFEST).is_file()

    chosen = manager.newest_valid()
    assert chosen is not None and chosen.name == "step-000000001"
    fresh = nn.Linear(4, 3)
    state = {"model": fresh.state_dict()}
    progress, rng = manager.load(chosen, state)
    assert progress["step"] == 1 and rng == {"r": 1}
    for key, value in saved.items():
        assert torch.equal(fresh.state_dict()[key], value)


def manager_complete(manager: CheckpointManager) -> list[bool]:
    """Per checkpoint under ``manager``, whether its save finished (its manifest is there)."""
    return [(p / MANIFEST).is_file() for p in manager.checkpoints()]


@pytest.mark.slow
def test_two_rank_pretraining_checkpoints_to_the_bucket_and_resumes_after_a_kill(
    s3, toy_synth: Path, tmp_path: Path
) -> None:
    """A rank SIGKILLed after the first checkpoint reached the bucket: torchrun restarts the
    group, which resumes from the bucket and ends exactly where a run on local disk ends; then
    a one-process fine-tuning on local disk starts from it."""
    args = ["--epochs", "2", "--batch-size", "32", "--checkpoint-every", "6"]
    calm = tmp_path / "calm"
    proc = subprocess.run(
        _torchrun("pretrain", "--data", str(toy_synth), "--out", str(calm), *args),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = f"s3://{BUCKET}/runs/pre-killed"
    manager = CheckpointManager(run)
    log = tmp_path / "hit.log"
    with open(log, "w") as sink:
        job = subprocess.Popen(
            _torchrun("pretrain", "--data", f"s3://{BUCKET}/toy", "--out", run, *args, restarts=1),
            env=_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        kill_a_rank_once(job, lambda: any(manager_complete(manager)), 1, log)
    output = log.read_text()
    assert job.returncode == 0, output[-3000:]
    assert "failed (exitcode: -9)" in output and f"resumed from {run}/checkpoints/step-" in output
    remote = json.loads((location(run) / "metrics.json").read_text())
    local = json.loads((calm / "metrics.json").read_text())
    assert remote["world_size"] == 2
    assert remote["epoch_loss"] == local["epoch_loss"]
    assert remote["hr@10_random"] == local["hr@10_random"]
    assert not (location(run) / ".lock").exists()
    complete = manager_complete(manager)
    assert complete and all(complete)
    assert (location(run) / "tensorboard").is_dir()

    # the other direction, resharded: the 2-rank run in the bucket starts a 1-process
    # fine-tuning on local disk
    local_ft = tmp_path / "ft-from-bucket"
    done = _cli(
        "finetune", "--data", str(toy_synth), "--out", str(local_ft), "--backbone", "dnn",
        "--transfer", "ps_mi", "--init-from", run, "--batch-size", "512", "--epochs", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    handoff = json.loads((local_ft / "metrics.json").read_text())
    assert handoff["world_size"] == 1 and handoff["loaded_tensors"] >= 2


@pytest.mark.slow
def test_finetune_evaluate_export_and_serve_through_the_bucket(
    s3, toy_pretrained: Path, tmp_path: Path
) -> None:
    """Pre-training run, fine-tuning run and artifact all in the bucket; the service pulls the
    artifact once into its cache and answers like the in-process predictor."""
    pre, ft, art = (f"s3://{BUCKET}/{name}" for name in ("pre", "ft", "artifact"))
    upload(toy_pretrained, pre)
    done = _cli(
        "finetune", "--data", f"s3://{BUCKET}/toy", "--out", ft, "--backbone", "dnn",
        "--transfer", "ps_mi", "--init-from", pre, "--batch-size", "256", "--epochs", "1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    test = json.loads(done.stdout.strip().splitlines()[-1])
    assert test["auc"] > 0.55
    evaluated = _cli("evaluate", "--run-dir", ft)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert again["auc"] == pytest.approx(test["auc"], abs=1e-6)

    exported = _cli("export", "--run", ft, "--out", art, "--compile", "none")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (location(art) / MANIFEST).is_file()
    refused = _cli("export", "--run", ft, "--out", art)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr

    proc, url = start_server(art)  # type: ignore[arg-type]
    try:
        predictor = Predictor(art)  # the same cached copy, verified again
        rng = np.random.default_rng(3)
        for history, candidates in [(0, 2), (20, 30)]:
            body = score_body(rng, history, candidates)
            response = httpx.post(f"{url}/score", json=body, timeout=30)
            assert response.status_code == 200, response.text
            np.testing.assert_allclose(
                response.json()["scores"], predictor.score(as_request(body)), atol=1e-6
            )
    finally:
        stop_server(proc)
    assert str(predictor.artifact.path).startswith(os.environ["GENCTR_CACHE"])


def test_storage_failures_are_one_line(s3, tmp_path: Path) -> None:
    """A missing bucket, keys the store does not know, no keys at all, no store at that
    address: one line each, no traceback, exit code 2."""
    cases = {
        "the bucket does not exist": _cli("data", "validate", "s3://no-such-bucket/toy"),
        "cannot reach the object store": _cli(
            "data",
            "validate",
            f"s3://{BUCKET}/toy",
            env=_env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}", AWS_MAX_ATTEMPTS="1"),
        ),
    }
    empty_home = tmp_path / "home"
    empty_home.mkdir()
    no_keys = {
        k: v for k, v in _env().items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    no_keys.update(
        HOME=str(empty_home),
        AWS_CONFIG_FILE=str(empty_home / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(empty_home / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    cases["no credentials for object storage"] = _cli(
        "pretrain", "--data", f"s3://{BUCKET}/toy", "--out", f"s3://{BUCKET}/x", env=no_keys
    )
    with s3_server(tmp_path / "auth.log", check_keys=True) as strict:
        cases["the access key is not known to the store"] = _cli(
            "serve", "--artifact", f"s3://{BUCKET}/artifact", env=_env(**strict)
        )
    for expected, proc in cases.items():
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert expected in lines[-1], proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_data_synth_writes_a_dataset_into_the_bucket(s3, toy_synth: Path) -> None:
    """The same recipe, the same rows, uploaded with meta.json last."""
    from genctr_rec.cli import main

    url = f"s3://{BUCKET}/synth-toy"
    assert main(["data", "synth", "--preset", "toy", "--out", url]) == 0
    assert validate_dataset(url) == validate_dataset(toy_synth)
    assert main(["data", "synth", "--preset", "toy", "--out", url]) == 2  # no --overwrite

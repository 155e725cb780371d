"""Checkpoints: exact resume, verified manifests, failed saves that keep the previous
checkpoint, a rank killed with SIGKILL under torchrun, and resharding across world sizes."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from genctr_rec.checkpoint import CheckpointManager, verify_manifest
from genctr_rec.distributed import free_port
from tests.distributed import kill_a_rank_once

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def _cli(*args: str, preexec=None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "genctr_rec.cli", *args],
        env=ENV,
        text=True,
        capture_output=True,
        timeout=600,
        preexec_fn=preexec,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _torchrun_cmd(*args: str, restarts: int = 0) -> list[str]:
    # c10d rendezvous (as torchx's components use): each restart round gets a fresh store;
    # with a static --master-port the restarted ranks find stale gloo addresses
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--max-restarts",
        str(restarts),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"localhost:{free_port()}",
        "-m",
        "genctr_rec.cli",
        *args,
    ]


def _model_tensors(run: Path, tmp: Path) -> dict[str, torch.Tensor]:
    out = tmp / f"{run.name}.pt"
    dcp_to_torch_save(run / "checkpoint", out)
    return torch.load(out, weights_only=False)["model"]


def _assert_same_model(a: Path, b: Path, tmp: Path) -> None:
    ta, tb = _model_tensors(a, tmp), _model_tensors(b, tmp)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), f"{key} differs"


PRETRAIN = ["--epochs", "2", "--batch-size", "32", "--checkpoint-every", "6"]


def test_resume_is_exact(toy_synth: Path, tmp_path: Path) -> None:
    """Stopped after step 13 (mid-epoch) and resumed == uninterrupted, bit for bit on CPU; the
    interrupted run decodes batches ahead on a thread (the uninterrupted one does not): the
    checkpoint holds the position trained on, not the one decoded."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    _cli("pretrain", "--data", str(toy_synth), "--out", str(whole), *PRETRAIN, "--prefetch", "0")
    _cli(
        "pretrain",
        "--data",
        str(toy_synth),
        "--out",
        str(split),
        *PRETRAIN,
        "--prefetch",
        "3",
        "--stop-after-steps",
        "13",
    )
    assert not (split / "metrics.json").exists()
    assert [p.name for p in CheckpointManager(split).checkpoints()] == [
        "step-000000012",
        "step-000000013",
    ]
    _cli("pretrain", "--data", str(toy_synth), "--out", str(split), *PRETRAIN, "--prefetch", "3")
    _assert_same_model(whole, split, tmp_path)
    mw = json.loads((whole / "metrics.json").read_text())
    ms = json.loads((split / "metrics.json").read_text())
    for key in ("epoch_loss", "hr@10_random", "ndcg@10_category"):
        assert mw[key] == ms[key], key


def _pretrain_until(data: Path, run: Path, steps: int) -> None:
    _cli(
        "pretrain",
        "--data",
        str(data),
        "--out",
        str(run),
        *PRETRAIN,
        "--stop-after-steps",
        str(steps),
    )


def _flip_a_byte(checkpoint: Path) -> Path:
    shard = next(checkpoint.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard


def test_resume_skips_a_damaged_checkpoint_for_the_newest_valid_one(
    toy_synth: Path, tmp_path: Path
) -> None:
    """Newest checkpoint damaged: resume says which one it skipped and why, resumes from the one
    before, and finishes; every checkpoint damaged: one clear error naming the files."""
    run = tmp_path / "run"
    _pretrain_until(toy_synth, run, 12)
    older, newest = CheckpointManager(run).checkpoints()
    shard = _flip_a_byte(newest)
    proc = _cli("pretrain", "--data", str(toy_synth), "--out", str(run), *PRETRAIN)
    assert f"skipping checkpoint {newest.name}" in proc.stderr
    assert f"{shard.name} fails its SHA-256 check" in proc.stderr
    assert f"resumed from {older}" in proc.stderr
    assert (run / "metrics.json").is_file()

    only = tmp_path / "only"
    _pretrain_until(toy_synth, only, 6)
    (latest,) = CheckpointManager(only).checkpoints()
    shard = _flip_a_byte(latest)
    proc = _cli("pretrain", "--data", str(toy_synth), "--out", str(only), *PRETRAIN, check=False)
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()[-1]
    assert "no checkpoint under" in error and "can be resumed" in error
    assert shard.name in error and "fails its SHA-256 check" in error
    assert not (only / "metrics.json").exists()


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))


def test_failed_save_keeps_the_previous_checkpoint(toy_synth: Path, tmp_path: Path) -> None:
    """A real write failure (files capped by RLIMIT_FSIZE, as on a full disk) fails the run with
    a clear error and leaves the previous checkpoint intact and resumable."""
    run = tmp_path / "run"
    _pretrain_until(toy_synth, run, 6)
    proc = _cli(
        "pretrain",
        "--data",
        str(toy_synth),
        "--out",
        str(run),
        *PRETRAIN,
        "--stop-after-steps",
        "12",
        preexec=_limit_file_size,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "saving checkpoint step 12" in proc.stderr and "previous checkpoint" in proc.stderr
    (kept,) = CheckpointManager(run).checkpoints()
    assert kept.name == "step-000000006"
    verify_manifest(kept)
    assert not list((run / "checkpoints").glob(".*tmp")), "no half-written checkpoint left"
    _cli("pretrain", "--data", str(toy_synth), "--out", str(run), *PRETRAIN)
    assert (run / "metrics.json").is_file()


FINETUNE = ["--backbone", "dnn", "--batch-size", "512", "--checkpoint-every", "5"]
# every table of a toy fine-tuning model: ids, the user table and the simulator's side features
TOY_TABLES = ("item", "category", "user_id", "user_segment", "user_interests", "item_tier")


@pytest.mark.slow
def test_sigkill_of_a_rank_restarts_and_finishes_identically(
    toy_synth: Path, tmp_path: Path
) -> None:
    calm, hit = tmp_path / "calm", tmp_path / "hit"
    cmd = ["finetune", "--data", str(toy_synth), *FINETUNE]
    proc = subprocess.run(
        _torchrun_cmd(*cmd, "--out", str(calm)),
        env=ENV,
        text=True,
        capture_output=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    log = tmp_path / "hit.log"
    with open(log, "w") as sink:  # a file, not a pipe: a full pipe would stall the job
        job = subprocess.Popen(
            _torchrun_cmd(*cmd, "--out", str(hit), restarts=1),
            env=ENV,
            text=True,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        kill_a_rank_once(job, lambda: bool(CheckpointManager(hit).checkpoints()), 0, log)
    output = log.read_text()
    assert job.returncode == 0, output[-3000:]
    assert "failed (exitcode: -9)" in output and "resumed from" in output
    _assert_same_model(calm, hit, tmp_path)
    assert (
        json.loads((calm / "metrics.json").read_text())["test"]
        == json.loads((hit / "metrics.json").read_text())["test"]
    )


def _compare_to_reference(ours, ref, path: str, mismatches: list[str]) -> int:
    """Recursively compare loaded (possibly sharded) state to full reference tensors."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(ours, dict):
        return sum(
            _compare_to_reference(v, ref[k], f"{path}.{k}", mismatches)
            for k, v in ours.items()
            if k in ref
        )
    if isinstance(ours, ShardedTensor):
        for shard in ours.local_shards():
            index = tuple(
                slice(o, o + n)
                for o, n in zip(
                    shard.metadata.shard_offsets, shard.metadata.shard_sizes, strict=True
                )
            )
            if not torch.equal(shard.tensor, ref[index]):
                mismatches.append(path)
        return 1
    if isinstance(ours, torch.Tensor):
        if not torch.equal(ours, ref):
            mismatches.append(path)
        return 1
    return 0


def _load_resharded(rank: int, world: int, run: str, sharding: str, reference: str):
    from genctr_rec.config import RunConfig
    from genctr_rec.distributed import init_distributed
    from genctr_rec.training.build import build_model
    from genctr_rec.training.sharding import sharding_summary

    cfg = RunConfig.load(run)
    cfg.train.sharding = {table: sharding for table in TOY_TABLES}
    built = build_model(cfg, init_distributed())
    built.dense_optimizer.init_state()
    state = built.app_state()
    manager = CheckpointManager(run)
    manager.load(manager.latest(), state, sharding_summary(built.dmp))
    built.load_app_state(state)
    ref = torch.load(reference, weights_only=False)
    mismatches: list[str] = []
    loaded = built.app_state()
    if state.get("resharding_reset"):  # what restarted is not compared
        loaded = {k: v for k, v in loaded.items() if k not in state["resharding_reset"]}
    compared = _compare_to_reference(loaded, ref, "", mismatches)
    plan = sharding_summary(built.dmp)
    return {
        "compared": compared,
        "mismatches": mismatches,
        "plan": plan,
        "reset": state.get("resharding_reset", []),
        "model_tensors": len(built.dmp.state_dict()),
    }


@pytest.mark.slow
def test_resharding_across_world_sizes_and_plans(toy_synth: Path, tmp_path: Path) -> None:
    """Written at world size 2 row-wise; read at 1 and 3 row-wise and at 2 table-wise: every
    embedding value and every optimizer state identical; read replicated: every weight."""
    from tests.distributed import run_ranks

    run = tmp_path / "run"
    proc = subprocess.run(
        _torchrun_cmd(
            "finetune",
            "--data",
            str(toy_synth),
            "--out",
            str(run),
            *FINETUNE,
            "--sharding",
            ",".join(f"{table}=row_wise" for table in TOY_TABLES),
            "--stop-after-steps",
            "3",
        ),
        env=ENV,
        text=True,
        capture_output=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = tmp_path / "reference.pt"
    dcp_to_torch_save(CheckpointManager(run).latest(), reference)
    for world, sharding in ((1, "row_wise"), (3, "row_wise"), (2, "table_wise")):
        for result in run_ranks(_load_resharded, world, str(run), sharding, str(reference)):
            assert set(result["plan"].values()) == {sharding}
            assert result["compared"] > 10 and result["mismatches"] == [], (world, sharding)
            assert result["reset"] == []
    # sharded -> replicated: the tables' optimizer state moves from fbgemm's fused optimizer to
    # the one stepped after the all-reduce, so the optimizer restarts; every weight loads
    for result in run_ranks(_load_resharded, 2, str(run), "data_parallel", str(reference)):
        assert set(result["plan"].values()) == {"data_parallel"}
        assert result["reset"] == ["optim"]
        assert result["compared"] == result["model_tensors"] and result["mismatches"] == []


def test_optimizer_state_is_reset_only_where_resharding_needs_it(tmp_path: Path) -> None:
    """Row-wise Adagrad state cannot move between column-wise and other layouts: loading across
    that change keeps the model and restarts the optimizer, and says so. The same failure on the
    same plan (a broken optimizer state, not a resharding) is an error naming the checkpoint."""
    from genctr_rec.checkpoint import CheckpointError

    manager = CheckpointManager(tmp_path)
    weights = torch.arange(12.0).view(3, 4)
    saved_plan = {"item": "column_wise"}
    progress = {"world_size": 1, "sharding": saved_plan}
    manager.save(1, {"model": {"w": weights}, "optim": {"m": torch.ones(3)}}, progress, {})

    def new_layout() -> dict:
        return {"model": {"w": torch.zeros(3, 4)}, "optim": {"m": torch.zeros(4)}}

    target = new_layout()
    manager.load(manager.latest(), target, {"item": "row_wise"})
    assert torch.equal(target["model"]["w"], weights)
    assert target["resharding_reset"] == ["optim"]
    for plan in (saved_plan, None):  # the same plan; a plan not known
        target = new_layout()
        with pytest.raises(CheckpointError, match=f"{manager.latest()}: cannot load"):
            manager.load(manager.latest(), target, plan)
        assert "resharding_reset" not in target
    with pytest.raises(CheckpointError, match="cannot load"):
        manager.load(manager.latest(), {"model": {"w": torch.zeros(2, 2)}}, {"item": "row_wise"})


def test_which_sharding_changes_cannot_carry_the_optimizer_state() -> None:
    from genctr_rec.checkpoint import optimizer_cannot_move

    assert optimizer_cannot_move({"a": "row_wise"}, {"a": "table_wise"}) == []  # DCP reshards
    assert optimizer_cannot_move({"a": "row_wise"}, {"a": "row_wise"}) == []
    assert optimizer_cannot_move({"a": "row_wise"}, {"a": "data_parallel"}) == [
        "a: row_wise -> data_parallel"
    ]
    assert optimizer_cannot_move({"a": "column_wise", "b": "row_wise"}, {"a": "table_wise"}) == [
        "a: column_wise -> table_wise"
    ]
    assert optimizer_cannot_move(None, {"a": "column_wise"}) == []


def test_checkpoint_from_the_one_module_table_layout_is_refused_with_the_reason(
    tmp_path: Path,
) -> None:
    """A 0.1 checkpoint (both tables in one module) names the version and what to do, through
    the training path (CheckpointManager.load) and the stage / export path (load_model)."""
    from genctr_rec.checkpoint import CheckpointError, load_model
    from genctr_rec.embeddings import SharedEmbeddings

    manager = CheckpointManager(tmp_path)
    old = {"embeddings.tables.embedding_bags.item.weight": torch.zeros(5, 4)}
    manager.save(1, {"model": old}, {"world_size": 1}, {})
    with pytest.raises(CheckpointError, match=r"genctr-rec 0\.1.*Re-run the stage"):
        manager.load(manager.latest(), {"model": {"w": torch.zeros(2)}})
    model = torch.nn.Module()
    model.embeddings = SharedEmbeddings(5, 2, dim=4, device=torch.device("cpu"))
    with pytest.raises(CheckpointError, match=r"embeddings\.tables\.embedding_bags\.item"):
        load_model(model, manager.latest())


def test_final_checkpoint_is_verified_before_evaluate_and_export(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    """RUN/checkpoint (what evaluate, export and --init-from read) has a manifest: flipped
    bytes or a truncated shard are refused with the file named, never a silent other AUC."""
    from genctr_rec.checkpoint import MANIFEST, CheckpointError
    from genctr_rec.serving.export import load_trained
    from genctr_rec.training.evaluate import evaluate_run

    run = tmp_path / "run"
    shutil.copytree(runs["genctr"], run)
    assert (run / "checkpoint" / MANIFEST).is_file()
    shard = max((run / "checkpoint").glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    shard.write_bytes(bytes(data))
    cfg = json.loads((run / "config.json").read_text())
    with pytest.raises(CheckpointError, match=f"{shard.name} fails its SHA-256 check"):
        evaluate_run(cfg["data"], run)
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(CheckpointError, match=f"{shard.name} has 100 bytes"):
        load_trained(run)


def test_fine_tuning_checkpoint_of_0_2_is_refused_with_the_reason(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    from genctr_rec.checkpoint import CheckpointError, check_table_layout

    torch_dcp_path = tmp_path / "old"
    dcp.save(
        {"model": {"backbone.final.weight": torch.zeros(1, 4)}},
        checkpoint_id=str(torch_dcp_path),
        no_dist=True,
    )
    with pytest.raises(CheckpointError, match=r"genctr-rec 0\.2.*Re-run the fine-tuning"):
        check_table_layout(torch_dcp_path)


def test_a_one_process_job_checkpoints_without_collectives(tmp_path: Path, monkeypatch) -> None:
    """With one process, DCP's metadata exchange through gloo is skipped: its large copy on
    gloo's thread made a second OpenMP team and slowed every later training step (issue 13).
    Any object collective during save or load fails this test."""
    import torch.distributed as dist

    from genctr_rec.checkpoint import load_model, save_model
    from genctr_rec.distributed import init_distributed

    init_distributed()
    assert dist.is_initialized() and dist.get_world_size() == 1

    def refuse(*args, **kwargs):
        raise AssertionError("a collective in a one-process checkpoint")

    for name in ("all_gather_object", "gather_object", "scatter_object_list", "all_gather"):
        monkeypatch.setattr(dist, name, refuse)
    model = torch.nn.Linear(4, 3)
    save_model(model, tmp_path / "m")
    target = torch.nn.Linear(4, 3)
    load_model(target, tmp_path / "m")
    assert torch.equal(target.weight, model.weight)
    manager = CheckpointManager(tmp_path)
    manager.save(1, {"model": model.state_dict()}, {"world_size": 1}, {})
    state = {"model": torch.nn.Linear(4, 3).state_dict()}
    manager.load(manager.latest(), state)
    assert torch.equal(state["model"]["weight"], model.weight)

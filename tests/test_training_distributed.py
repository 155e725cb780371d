"""Training on sharded tables: equivalence with one process, stage handoff, and the commands
end to end under torchrun. Real processes, real gloo process groups."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torchrec import KeyedJaggedTensor

from genctr_rec.checkpoint import load_model
from genctr_rec.config import TRANSFER_PREFIXES, ModelConfig, RunConfig, TrainConfig
from genctr_rec.data.features import FeatureSchema
from genctr_rec.data.reader import ImpressionBatch, ImpressionReader
from genctr_rec.data.synth import SynthConfig, generate
from genctr_rec.distributed import init_distributed
from genctr_rec.training.build import build_model
from tests.distributed import run_ranks, torchrun
from tests.helpers import MAX_HISTORY, NUM_CATEGORIES, NUM_ITEMS

GLOBAL_BATCH = 96


def _known_table(rows: int, cols: int, salt: int) -> torch.Tensor:
    r = torch.arange(rows, dtype=torch.float32).unsqueeze(1)
    c = torch.arange(cols, dtype=torch.float32).unsqueeze(0)
    return torch.sin(0.37 * r + 1.3 * c + salt) * 0.1


def _set_known_tables(dmp) -> None:
    """DMP initialises shards from its own RNG; write the same values whatever the plan."""
    for key, value in dmp.state_dict().items():
        if "embeddings.tables" not in key or not key.endswith("weight"):
            continue
        salt = 1 if ".item." in key else 3 if ".features." in key else 2
        if isinstance(value, ShardedTensor):
            full = _known_table(*value.size(), salt)
            for shard in value.local_shards():
                (r, c), (n, m) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.detach().copy_(full[r : r + n, c : c + m])
        else:
            value.detach().copy_(_known_table(*value.shape, salt))


def _slice(kjt: KeyedJaggedTensor, start: int, stop: int) -> KeyedJaggedTensor:
    values, lengths = [], []
    for key in kjt.keys():
        jt = kjt[key]
        offsets = jt.offsets()
        values.append(jt.values()[offsets[start] : offsets[stop]])
        lengths.append(jt.lengths()[start:stop])
    return KeyedJaggedTensor(keys=kjt.keys(), values=torch.cat(values), lengths=torch.cat(lengths))


def _rows(batch: ImpressionBatch, start: int, stop: int) -> ImpressionBatch:
    side = batch.side_features
    return ImpressionBatch(
        _slice(batch.sparse_features, start, stop),
        batch.labels[start:stop],
        batch.user_ids[start:stop],
        None if side is None else _slice(side, start, stop),
    )


USERS = 400  # the small dataset's user_id is the row number: later rows share the default row


def _train_steps(
    rank: int,
    world: int,
    data: str,
    sharding: dict[str, str],
    steps: int,
    features: bool,
    split: int = GLOBAL_BATCH // 2,
):
    """``split``: rank 0 of 2 takes that many rows of each batch, rank 1 the rest (uneven
    batches make sharded lookups pad to the largest rank's)."""
    ctx = init_distributed()
    schema = FeatureSchema(num_users=USERS) if features else None
    cfg = RunConfig(
        "finetune",
        data,
        ModelConfig(),
        TrainConfig(seed=0, batch_size=GLOBAL_BATCH, sharding=sharding),
        backbone="dcnv2_ta",
        transfer="decoder",
        num_items=NUM_ITEMS,
        num_categories=NUM_CATEGORIES,
        max_history=MAX_HISTORY,
        features=schema.to_json() if schema else None,
    )
    built = build_model(cfg, ctx)
    dmp = built.dmp
    _set_known_tables(dmp)
    reader = ImpressionReader(data, "train", GLOBAL_BATCH, 0, 1, shuffle=False, features=schema)
    bounds = [0, GLOBAL_BATCH] if world == 1 else [0, split, GLOBAL_BATCH]
    logits_out, losses = [], []
    for i, batch in enumerate(reader):
        if i == steps:
            break
        mine = _rows(batch, bounds[rank], bounds[rank + 1])
        built.dense_optimizer.zero_grad()
        logits = dmp(mine.sparse_features, mine.side_features)
        loss = F.binary_cross_entropy_with_logits(logits, mine.labels)
        logits_out.append(logits.detach())
        losses.append(float(loss))
        loss.backward()
        built.dense_optimizer.step()
    tables = {
        key: value.detach().clone()
        for key, value in dmp.state_dict().items()
        if key.startswith("embeddings.tables.") and not isinstance(value, ShardedTensor)
    }
    return {
        "logits": logits_out,
        "losses": losses,
        "plan": dmp.plan.plan,
        "replicated_tables": tables,
        "optimizer_keys": list(built.optimizer.state_dict()["state"]),
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "item,category,user",
    [
        ("row_wise", "row_wise", None),
        ("table_wise", "table_wise", None),
        ("data_parallel", "data_parallel", None),
        ("row_wise", "data_parallel", None),  # the default plan at scale: big table sharded
        ("row_wise", "data_parallel", "row_wise"),  # a sharded user table in the features
    ],
)
def test_sharded_training_matches_one_process(
    small_dataset: Path, item: str, category: str, user: str | None
) -> None:
    """Same initial weights and batches: same forward outputs and loss trajectory, whichever
    the plan; replicated tables stay equal on every rank and keep the tables' optimizer. With
    a sharded user table, an uneven split of the batch (50 / 46 rows) gives the same outputs."""
    steps = 4
    sharding = {"item": item, "category": category}
    if user:
        sharding["user_id"] = user
    args = (str(small_dataset), sharding, steps, user is not None)
    single = run_ranks(_train_steps, 1, *args)[0]
    sharded = run_ranks(_train_steps, 2, *args)
    for step in range(steps):
        together = torch.cat([r["logits"][step] for r in sharded])
        assert torch.allclose(together, single["logits"][step], atol=1e-5), f"step {step}"
        mean_loss = sum(r["losses"][step] for r in sharded) / 2
        assert mean_loss == pytest.approx(single["losses"][step], abs=1e-5)
    if user:  # forward only: an uneven step trains differently under DDP's mean
        uneven = run_ranks(_train_steps, 2, *args[:2], 1, True, 50)
        together = torch.cat([r["logits"][0] for r in uneven])
        assert torch.allclose(together, single["logits"][0], atol=1e-5)
    assert single["losses"][-1] != single["losses"][0], "the model trained"
    plan = {table: spec for module in sharded[0]["plan"].values() for table, spec in module.items()}
    assert {table: spec.sharding_type for table, spec in plan.items()} == sharding
    for table, spec in plan.items():
        if spec.sharding_type in ("row_wise", "data_parallel"):
            assert len(spec.ranks) == 2, table
    replicated = [t for t, kind in sharding.items() if kind == "data_parallel"]
    assert len(sharded[0]["replicated_tables"]) == len(replicated)
    for key, value in sharded[0]["replicated_tables"].items():
        assert torch.equal(value, sharded[1]["replicated_tables"][key]), key
        assert not torch.equal(value, _known_table(*value.shape, 1 if ".item." in key else 2))
    for table in replicated:  # row-wise Adagrad's per-row state, not Adam's, in the checkpoint
        found = [k for k in sharded[0]["optimizer_keys"] if f"embedding_bags.{table}." in k]
        assert found and all(k.startswith("dense.replicated.") for k in found), found


def _full_state(dmp) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in dmp.state_dict().items():
        if isinstance(value, ShardedTensor):
            (shard,) = value.local_shards()  # one process: one shard holds the whole table
            out[key] = shard.tensor.detach().clone()
        else:
            out[key] = value.detach().clone()
    return out


@pytest.mark.parametrize("transfer", ["ps", "ps_decoder", "ps_mi"])
def test_transfer_loads_what_it_should(
    toy_pretrained: Path, toy_synth: Path, tmp_path: Path, transfer: str
) -> None:
    dcp_to_torch_save(toy_pretrained / "checkpoint", tmp_path / "pre.pt")
    saved = torch.load(tmp_path / "pre.pt", weights_only=False)["model"]
    cfg = RunConfig.load(toy_pretrained)
    cfg.stage, cfg.backbone, cfg.transfer = "finetune", "dnn", transfer
    cfg.train.seed = 99  # a different init, so equality can only come from loading
    built = build_model(cfg, init_distributed())
    before = _full_state(built.dmp)
    load_model(built.dmp, toy_pretrained / "checkpoint", TRANSFER_PREFIXES[transfer])
    after = _full_state(built.dmp)
    tables = [k for k in saved if k.startswith("embeddings.")]
    assert tables and all(torch.equal(after[k], saved[k].to(after[k].dtype)) for k in tables)
    assert all(not torch.equal(before[k], after[k]) for k in tables)
    decoder_keys = [k for k in saved if k.startswith("decoder.")]
    if transfer == "ps":
        assert not any(k.startswith("decoder.") for k in after)
    elif transfer == "ps_decoder":
        assert any(not torch.equal(after[k], saved[k]) for k in decoder_keys)
    else:
        assert all(torch.equal(after[k], saved[k]) for k in decoder_keys)
    backbone = [k for k in after if k.startswith("backbone.")]
    assert all(torch.equal(before[k], after[k]) for k in backbone), "backbone stays fresh"


@pytest.mark.slow
def test_commands_under_torchrun_learn(tmp_path: Path) -> None:
    """pretrain -> finetune (GenCTR) -> evaluate on two ranks: pre-training loss falls, test AUC
    is well above chance, and evaluate reproduces the fine-tuning run's metrics."""
    data = tmp_path / "data"
    generate(SynthConfig(num_users=1200, num_items=1500, num_categories=30), data)
    torchrun(
        ["pretrain", "--data", str(data), "--out", str(tmp_path / "pre"), "--epochs", "3"], tmp_path
    )
    pre = json.loads((tmp_path / "pre" / "metrics.json").read_text())
    assert pre["world_size"] == 2
    # 1,500 x 16 and 30 x 16 floats: both under replicate_max_mb, so replicated
    assert pre["sharding"] == {"item": "data_parallel", "category": "data_parallel"}
    assert pre["epoch_loss"][2] < pre["epoch_loss"][0] - 0.05
    assert pre["hr@10_random"] > 0.2  # chance is 10/101
    torchrun(
        [
            "finetune",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "ft"),
            "--backbone",
            "dnn",
            "--transfer",
            "ps_mi",
            "--init-from",
            str(tmp_path / "pre"),
            "--batch-size",
            "256",
        ],
        tmp_path,
    )
    test = json.loads((tmp_path / "ft" / "metrics.json").read_text())["test"]
    assert test["auc"] > 0.6 and test["rows"] > 10_000
    # stage handoff across world sizes: a 2-rank pre-training read by a 1-process fine-tuning
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "genctr_rec.cli",
            "finetune",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "ft1"),
            "--backbone",
            "dcnv2",
            "--transfer",
            "ps",
            "--init-from",
            str(tmp_path / "pre"),
            "--batch-size",
            "512",
        ],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    handoff = json.loads((tmp_path / "ft1" / "metrics.json").read_text())
    assert handoff["world_size"] == 1 and handoff["loaded_tensors"] == 2
    out = torchrun(["evaluate", "--data", str(data), "--run-dir", str(tmp_path / "ft")], tmp_path)
    last = json.loads(out.strip().splitlines()[-1])
    assert set(last) == {"auc", "gauc", "logloss", "ne", "calibration", "rows"}
    for name in ("auc", "gauc", "ne", "calibration"):
        assert last[name] == pytest.approx(test[name], abs=1e-6), name
    assert last["rows"] == test["rows"]
    # serving handoff: one process exports the 2-rank sharded checkpoint
    exported = subprocess.run(
        [sys.executable, "-m", "genctr_rec.cli", "export", "--run", str(tmp_path / "ft"),
         "--out", str(tmp_path / "artifact"), "--compile", "none"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-3000:]
    printed = json.loads(exported.stdout.strip().splitlines()[-1])
    assert printed["max_abs_diff_vs_trained"] <= 1e-5
    assert printed["test_auc_exported"] == pytest.approx(test["auc"], abs=1e-6)

"""Model selection that a noisy validation cannot stop early (min_epochs, plateau decay of the
learning rates, selection on LogLoss) and Platt calibration fitted on validation, applied to the
test figures, ``genctr evaluate`` and the exported artifact."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from genctr_rec.calibration import CALIBRATION_FILE, Calibration, fit_platt


def _clicks(rng: np.random.Generator, logits: np.ndarray, scale: float, bias: float):
    p = 1.0 / (1.0 + np.exp(-(scale * logits + bias)))
    return (rng.random(len(logits)) < p).astype(np.float32)


def test_platt_recovers_the_true_scale_and_bias() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, 200_000)
    fitted = fit_platt(logits, _clicks(rng, logits, 0.5, -1.0), "synthetic")
    assert fitted.method == "platt"
    assert fitted.scale == pytest.approx(0.5, abs=0.02)
    assert fitted.bias == pytest.approx(-1.0, abs=0.02)
    assert fitted.logloss_after < fitted.logloss_before
    p = fitted.probabilities(logits)
    assert np.argsort(p, kind="stable").tolist() == np.argsort(logits, kind="stable").tolist()


def test_platt_leaves_scores_alone_where_it_cannot_help() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 1.0, 5_000)
    one_class = fit_platt(logits, np.zeros_like(logits))
    reversed_order = fit_platt(logits, _clicks(rng, logits, -2.0, 0.0))
    for fitted in (one_class, reversed_order):
        assert (fitted.method, fitted.scale, fitted.bias) == ("none", 1.0, 0.0)


def test_scaling_reaches_the_fused_table_kernels(toy_synth: Path) -> None:
    """Plateau decay changes every rate, the fbgemm kernels' included (they update the tables
    inside the backward, from a rate they hold themselves)."""
    from genctr_rec.config import ModelConfig, RunConfig, TrainConfig
    from genctr_rec.data.schema import DatasetMeta
    from genctr_rec.distributed import init_distributed
    from genctr_rec.training.build import build_model

    meta = DatasetMeta.read(toy_synth)
    cfg = RunConfig(
        "finetune",
        str(toy_synth),
        ModelConfig(side_features=False),
        TrainConfig(batch_size=64, lr=2e-3, embedding_lr=0.04).resolve("finetune"),
        backbone="dnn",
    )
    cfg.num_items, cfg.num_categories, cfg.max_history = (
        meta.num_items,
        meta.num_categories,
        meta.max_history,
    )
    built = build_model(cfg, init_distributed())
    kernels = list(_fbgemm_kernels(built.dmp.fused_optimizer))
    assert kernels and all(k.get_learning_rate() == pytest.approx(0.04) for k in kernels)
    built.scale_learning_rates(0.25)
    assert all(k.get_learning_rate() == pytest.approx(0.01) for k in kernels)
    assert [g["lr"] for g in built.dense_optimizer.param_groups] == [pytest.approx(5e-4)]
    built.scale_learning_rates(1.0)
    assert all(k.get_learning_rate() == pytest.approx(0.04) for k in kernels)


def _fbgemm_kernels(optimizer):
    """The fbgemm modules behind TorchRec's fused optimizers (each holds its own rate)."""
    for _, child in getattr(optimizer, "_optims", []):
        yield from _fbgemm_kernels(child)
    if hasattr(optimizer, "_emb_module"):
        yield optimizer._emb_module


@pytest.mark.slow
def test_patience_waits_for_min_epochs_and_decays_on_plateau(
    toy_synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation figures forced worse after the first: patience 1 would stop at the second
    validation; ``min_epochs 2`` keeps the run going to the end of epoch 2, each validation
    without improvement halves the rates, and the first (best, lowest LogLoss) model is kept."""
    import genctr_rec.training.finetune as finetune_module
    from genctr_rec.config import ModelConfig, RunConfig, TrainConfig
    from genctr_rec.training.finetune import finetune

    real = finetune_module.evaluate_ctr
    forced = iter([0.50, 0.60, 0.61, 0.62, 0.63, 0.64, 0.65, 0.66])

    def evaluate(*args, **kwargs):
        metrics = real(*args, **kwargs)
        if kwargs.get("reader") is not None:  # a validation (the test split has no reader)
            metrics["logloss"] = next(forced)
        return metrics

    monkeypatch.setattr(finetune_module, "evaluate_ctr", evaluate)
    cfg = RunConfig(
        "finetune",
        str(toy_synth),
        ModelConfig(side_features=False),
        TrainConfig(
            epochs=4,
            batch_size=256,
            patience=1,
            min_epochs=2,
            lr_decay=0.5,
            evals_per_epoch=2,
            select_on="logloss",
        ),
        backbone="dnn",
    )
    metrics = finetune(cfg, tmp_path / "run")
    valid = metrics["valid"]
    assert len(valid) >= 4 and [v["logloss"] for v in valid] == [0.50, 0.60, 0.61, 0.62][
        : len(valid)
    ] + [0.63, 0.64, 0.65, 0.66][: max(0, len(valid) - 4)]
    assert valid[-1]["epoch"] == 1  # the end of the second epoch, not the first bad one
    assert len(metrics["epoch_loss"]) == 2
    assert metrics["stopped"] == {"step": valid[-1]["step"], "reason": "patience"}
    assert metrics["selected"]["step"] == valid[0]["step"]
    assert metrics["lr_scale"] == pytest.approx(0.5 ** (len(valid) - 1))


def test_a_run_applies_its_calibration_everywhere(
    runs: dict[str, Path], artifacts: dict[str, dict]
) -> None:
    """metrics.json's test figures, ``genctr evaluate`` and the exported artifact all score
    with the Platt scaling fitted on validation; AUC is the raw scores'."""
    from genctr_rec.training.evaluate import evaluate_run

    run = runs["genctr"]
    calibration = Calibration.of_run(run)
    assert calibration.method == "platt" and calibration.rows > 0
    assert abs(calibration.scale - 1) + abs(calibration.bias) > 1e-3  # it does something
    assert calibration.logloss_after < calibration.logloss_before
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["calibration"] == json.loads((run / CALIBRATION_FILE).read_text())
    test, raw = metrics["test"], metrics["test_uncalibrated"]
    assert test["auc"] == pytest.approx(raw["auc"], abs=1e-9)
    assert test["logloss"] != pytest.approx(raw["logloss"], abs=1e-6)
    assert evaluate_run(None, run)["logloss"] == pytest.approx(test["logloss"], abs=1e-6)
    meta = artifacts["genctr-none"]["meta"]
    assert meta["calibration"] == calibration.to_json()
    assert meta["parity"]["exported"]["logloss"] == pytest.approx(test["logloss"], abs=1e-4)


@pytest.mark.parametrize(
    "content, says",
    [
        ('{"scale": 1.2, "bias"', "not a calibration"),
        ('{"scale": "wide", "bias": 0.1}', "not a calibration"),
        ("[1.2, 0.1]", "not a calibration"),
        ('{"scale": -1.0, "bias": 0.0}', "scale > 0"),
        ('{"scale": NaN, "bias": 0.0}', "finite"),
    ],
)
def test_a_damaged_calibration_is_one_line_naming_the_file(
    runs: dict[str, Path], tmp_path: Path, capsys, content: str, says: str
) -> None:
    """A truncated, mistyped or order-reversing calibration.json stops ``genctr evaluate`` with
    one line naming the file, never a JSON traceback or silently reversed scores."""
    import shutil

    from genctr_rec.cli import main

    run = tmp_path / "run"
    shutil.copytree(runs["genctr"], run, ignore=shutil.ignore_patterns("checkpoint*", "*.tmp"))
    (run / CALIBRATION_FILE).write_text(content)
    code = main(["evaluate", "--run", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and str(run / CALIBRATION_FILE) in err[0] and says in err[0], err


def _table(run: Path, name: str, stage: str = "finetune"):
    """One table's weights from a run's selected checkpoint, loaded unsharded."""
    import torch

    from genctr_rec.checkpoint import load_model
    from genctr_rec.config import RunConfig
    from genctr_rec.factory import build_stage_model

    cfg = RunConfig.load(run)
    model = build_stage_model(cfg, torch.device("cpu"), dedup=False)
    load_model(model, run / "checkpoint", no_dist=True)
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if k.startswith(f"embeddings.tables.{name}.")
    }


@pytest.mark.slow
def test_inherited_tables_can_be_frozen(toy_synth: Path, toy_pretrained: Path, tmp_path: Path):
    """GPSD's frozen sparse transfer: ``--inherited-tables-lr 0`` keeps the item and category
    tables exactly as pre-training left them while the rest trains; by default they move."""
    import torch

    from genctr_rec.config import ModelConfig, RunConfig, TrainConfig
    from genctr_rec.training.finetune import finetune

    for rate in (0.0, None):
        cfg = RunConfig(
            "finetune",
            str(toy_synth),
            ModelConfig(),
            TrainConfig(epochs=1, batch_size=256, inherited_tables_lr=rate, calibrate="none"),
            backbone="dnn",
            transfer="ps",
            init_from=str(toy_pretrained),
        )
        run = tmp_path / f"lr-{rate}"
        finetune(cfg, run)
        for name in ("item", "category"):
            before, after = _table(toy_pretrained, name), _table(run, name)
            assert before.keys() == after.keys() and before
            same = all(torch.equal(before[k], after[k]) for k in before)
            assert same == (rate == 0.0), (name, rate)
        assert Calibration.of_run(run).method == "none"


def test_refit_trains_every_row_for_the_selected_length(
    toy_synth: Path, tmp_path: Path, capsys
) -> None:
    """``--refit``: RUN/selection chooses the length on validation; RUN then trains every
    train/ row (the validation slice included) for as many epochs and keeps that model, which
    ``genctr evaluate`` scores as metrics.json says. Without a slice to give back it refuses."""
    from genctr_rec.cli import main
    from genctr_rec.training.evaluate import evaluate_run
    from genctr_rec.training.finetune import train_rows

    out = tmp_path / "run"
    flags = ["--data", str(toy_synth), "--backbone", "dnn", "--batch-size", "256"]
    assert main(["finetune", *flags, "--epochs", "2", "--out", str(out), "--refit"]) == 0
    chosen = json.loads((out / "selection" / "metrics.json").read_text())["selected"]
    final = json.loads((out / "metrics.json").read_text())
    total = train_rows(toy_synth)
    assert 0 < chosen["rows"] < total  # the selection run held the newest rows out
    steps = round(chosen["step"] * total / (total - chosen["rows"]))
    assert final["refit"]["steps"] == steps and final["refit"]["rows"] == total
    assert final["stopped"] == {"reason": "max_steps", "step": steps}
    assert final["validation_split"] == "none" and final["selected"] is None
    # one epoch over every row is longer than one over the rows the selection trained on: the
    # refit's epoch count tells which rows its reader had
    per_epoch = -(-total // 256)
    assert len(final["epoch_loss"]) == -(-steps // per_epoch)
    assert evaluate_run(None, out)["auc"] == pytest.approx(final["test"]["auc"], abs=1e-6)
    assert final["test"]["auc"] != pytest.approx(final["refit"]["selection_test"]["auc"], abs=1e-6)

    # stopped twice while it selects (a preemption: RUN/selection has no metrics.json yet), the
    # same command resumes it to the same refit; the refit half resumes as every run does
    from genctr_rec.config import ModelConfig, RunConfig, TrainConfig
    from genctr_rec.training.finetune import finetune

    train = TrainConfig(epochs=2, batch_size=256, refit=True)
    cfg = RunConfig("finetune", str(toy_synth), ModelConfig(), train, backbone="dnn")
    stopped = tmp_path / "stopped"
    selecting = json.loads((out / "selection" / "metrics.json").read_text())["stopped"]["step"]
    for stop in (chosen["step"] // 2, selecting - 1):
        assert finetune(copy.deepcopy(cfg), stopped, stop_after_steps=stop) is None
        assert not (stopped / "selection" / "metrics.json").exists()
    resumed = finetune(copy.deepcopy(cfg), stopped)
    assert resumed["refit"] == final["refit"]
    assert resumed["test"]["auc"] == pytest.approx(final["test"]["auc"], abs=1e-9)

    again = ["finetune", *flags, "--out", str(tmp_path / "x"), "--refit", "--valid-fraction", "0"]
    assert main(again) == 2
    assert "--refit" in capsys.readouterr().err

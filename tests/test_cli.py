"""The command line's surface: help for every flag with the stage's defaults, -v anywhere,
--version, a -h that does not import torch, third-party warnings hidden unless -v, progress
lines where stderr is not a terminal, rounded results, and TensorBoard tags and hparams."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from genctr_rec import __version__
from genctr_rec.cli import _sub_parsers, build_parser, main

FINETUNE = ["--backbone", "dnn", "--batch-size", "64", "--epochs", "1"]


def test_every_flag_of_every_command_says_what_it_does() -> None:
    parser = build_parser()
    for command in [parser, *_sub_parsers(parser)]:
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{command.prog} {action.option_strings[0]} has no help"


def test_help_shows_each_stage_s_defaults() -> None:
    stages = {p.prog.split()[-1]: p for p in _sub_parsers(build_parser())}
    text = " ".join(stages["finetune"].format_help().split())
    assert "embedding and decoder width. (default: 16)" in text
    assert "(default: product)" in text and "(default: pre-training 32, fine-tuning 1024)" in text
    assert "--num-negatives" not in text, "a pre-training flag is not offered to fine-tuning"
    assert "--num-negatives" in stages["pretrain"].format_help()


def test_verbose_anywhere_and_version(capsys) -> None:
    parser = build_parser()
    assert parser.parse_args(["data", "validate", "d"]).verbose is False
    assert parser.parse_args(["-v", "data", "validate", "d"]).verbose is True
    assert parser.parse_args(["data", "validate", "d", "-v"]).verbose is True
    assert parser.parse_args(["serve", "--artifact", "a", "--verbose"]).verbose is True
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"genctr-rec {__version__}"


def test_help_does_not_import_torch() -> None:
    """`genctr -h` answers at once: torch (seconds to import) loads only for real work."""
    code = (
        "import sys; from genctr_rec.cli import build_parser; "
        "[p.format_help() for p in [build_parser()]]; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _finetune(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GENCTR_PROGRESS_EVERY_S": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "genctr_rec.cli", "finetune", "--data", str(data)]
        + ["--out", str(out), *FINETUNE, *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_quiet_output_progress_lines_and_rounded_results(
    small_dataset: Path, tmp_path: Path
) -> None:
    """Under a scheduler (stderr not a terminal): a progress line with the step count, loss,
    throughput and ETA, results as rounded JSON, and none of the stack's known warnings; -v
    shows them again."""
    quiet = _finetune(small_dataset, tmp_path / "quiet")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "Warning" not in quiet.stderr and "is_fx_tracing" not in quiet.stderr
    line = next(x for x in quiet.stderr.splitlines() if "progress: finetune epoch 1/1:" in x)
    assert re.search(r"\d+/\d+ steps \(\d+%\), loss \d\.\d{4}, [\d,]+ examples/s, .*ETA", line)
    assert any("progress: evaluate test:" in x for x in quiet.stderr.splitlines())
    done = next(x for x in quiet.stderr.splitlines() if "finetune done:" in x)
    results = json.loads(done.split("finetune done: ", 1)[1])
    assert {"auc", "gauc", "logloss", "ne", "calibration"} <= set(results)
    assert all(len(str(v).split(".")[-1]) <= 4 for v in results.values() if isinstance(v, float))

    verbose = _finetune(small_dataset, tmp_path / "verbose", "-v")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "HeuristicalStorageReservation" in verbose.stderr


def test_tensorboard_has_stable_tags_and_hparams(small_dataset: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["finetune", "--data", str(small_dataset), "--out", str(run), *FINETUNE]) == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {"train/loss", "train/epoch_loss", "train/examples_per_s", "train/lr/dense"}
    expected |= {"train/lr/embeddings"}
    expected |= {f"eval/{m}" for m in ("auc", "gauc", "logloss", "ne", "calibration")}
    expected |= {f"test/{m}" for m in ("auc", "gauc", "logloss", "ne", "calibration")}
    assert expected <= tags, expected - tags
    test_auc = events.Scalars("test/auc")[-1].value
    metrics = json.loads((run / "metrics.json").read_text())
    assert test_auc == pytest.approx(metrics["test"]["auc"], abs=1e-6)
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")

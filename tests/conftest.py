from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from genctr_rec.data.synth import SynthConfig, generate
from tests.helpers import warning_record, write_dataset

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the suite on as many pytest-xdist workers as cores: one thread a worker
    # (and for the processes it starts), so that the workers share the cores instead of
    # oversubscribing them with each one's OpenMP pool
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Modules longest first (pytest --durations, serially on CI's 2-core machine, 2026-12-07), so
# that the two workers of `make test` end together instead of one of them running a long module
# collected last while the other idles: `--dist loadscope` hands a worker the next module as it
# runs out, in this order (the Makefile turns off xdist's own reordering, by test count). The
# first builds the shared runs and artifacts while the second needs none of them. The rest, each
# under 15 s, keep their order; so do the tests within a module.
HEAVIEST_FIRST = (
    "test_export.py",
    "test_checkpoint.py",
    "test_training_distributed.py",
    "test_object_storage.py",
    "test_preemption.py",
    "test_launchers.py",
    "test_method.py",
    "test_model_swap.py",
    "test_compiled.py",
    "test_server.py",
    "test_server_robustness.py",
    "test_server_workers.py",
    "test_raw_ids.py",
    "test_reader.py",
    "test_cluster_plans.py",
    "test_packed.py",
    "test_security.py",
    "test_cli.py",
    "test_contributing.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: others keep order


@pytest.fixture()
def small_dataset(tmp_path: Path) -> Path:
    """A hand-built valid dataset (fresh per test, so tests may break it)."""
    return write_dataset(tmp_path / "data")


def built_once(factory: pytest.TempPathFactory, name: str, build: Callable[[Path], Any]) -> Any:
    """``build(folder)`` for a read-only session fixture, run once for the whole suite.

    Under pytest-xdist every worker holds its own session, and would train and export the
    shared runs again (a CPU minute each): the first worker to ask builds them in the folder
    all workers share, under a file lock, and records what ``build`` returned (JSON); the others
    wait on the lock and read it."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(factory.mktemp(name))
    from filelock import FileLock

    folder = factory.getbasetemp().parent / name
    record = folder / "built.json"
    with FileLock(f"{folder}.lock"):
        if not record.is_file():
            folder.mkdir(exist_ok=True)
            record.write_text(json.dumps(build(folder), default=str))
    return json.loads(record.read_text())


@pytest.fixture(scope="session")
def toy_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The simulator's toy preset, generated once per suite (read-only for tests)."""

    def build(folder: Path) -> str:
        generate(SynthConfig.preset("toy"), folder / "toy")
        return str(folder / "toy")

    return Path(built_once(tmp_path_factory, "synth", build))


@pytest.fixture(scope="session")
def toy_pretrained(tmp_path_factory: pytest.TempPathFactory, toy_synth: Path) -> Path:
    """One epoch of pre-training on the toy preset, shared by the tests that fine-tune from it."""
    from genctr_rec.config import ModelConfig, RunConfig, TrainConfig
    from genctr_rec.training.pretrain import pretrain

    def build(folder: Path) -> str:
        cfg = RunConfig(
            "pretrain", str(toy_synth), ModelConfig(), TrainConfig(epochs=1, batch_size=64, seed=3)
        )
        pretrain(cfg, folder / "pre")
        return str(folder / "pre")

    return Path(built_once(tmp_path_factory, "runs", build))


@pytest.fixture(scope="session")
def runs(tmp_path_factory, toy_synth: Path, toy_pretrained: Path) -> dict[str, Path]:
    """Fine-tuned toy runs for export and serving: GenCTR (DNN, PS + MI, dim 16, with the toy
    data's user and side features) and a backbone alone (DCN V2 + TA, dim 64, ids only)."""
    build = partial(_finetune_runs, toy_synth=toy_synth, toy_pretrained=toy_pretrained)
    built = built_once(tmp_path_factory, "finetuned", build)
    return {name: Path(path) for name, path in built.items()}


def _finetune_runs(root: Path, toy_synth: Path, toy_pretrained: Path) -> dict[str, str]:
    from genctr_rec.config import ModelConfig, RunConfig, TrainConfig
    from genctr_rec.training.finetune import finetune

    specs = {
        "genctr": RunConfig(
            "finetune",
            str(toy_synth),
            ModelConfig(),
            TrainConfig(epochs=1, batch_size=256, seed=1),
            backbone="dnn",
            transfer="ps_mi",
            init_from=str(toy_pretrained),
        ),
        "ta64": RunConfig(
            "finetune",
            str(toy_synth),
            ModelConfig(dim=64, side_features=False),
            TrainConfig(epochs=1, batch_size=256, seed=2),
            backbone="dcnv2_ta",
        ),
    }
    for name, cfg in specs.items():
        finetune(cfg, root / name)
    return {name: str(root / name) for name in specs}


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory, runs: dict[str, Path]) -> dict[str, dict]:
    """Each run exported fp32 and int8: {"genctr-int8": {"path": ..., "meta": ...}, ...}.
    ``genctr-none`` is the default artifact (torch.export, compiled by AOTInductor: about a
    minute); the others keep their exported programs uncompiled (seconds), which serve the
    same scores. Each also records the warnings its export raised (``warning_record``)."""
    built = built_once(tmp_path_factory, "artifacts", partial(_export_runs, runs=runs))
    return {name: {**art, "path": Path(art["path"])} for name, art in built.items()}


# Inductor's cache directory while the shared artifacts export, beside them: export compiles in
# a private cache and must leave it empty (test_a_second_model_compiles_right_beside_the_first)
INDUCTOR = "inductor-cache"


def _export_runs(root: Path, runs: dict[str, Path]) -> dict[str, dict]:
    # torch's own TorchScript classes, defined when Inductor first imports this module: their
    # deprecation notices belong to torch's import, not to our export
    import torch.utils.mkldnn  # noqa: F401

    from genctr_rec.environ import environment
    from genctr_rec.serving.export import export_run
    from genctr_rec.serving.exported import INDUCTOR_CACHE

    shared = str(root / INDUCTOR)  # a job's own cache directory, which export must not use
    out = {}
    for name, run in runs.items():
        for quantize in ("none", "int8"):
            path = root / f"{name}-{quantize}"
            default = name == "genctr" and quantize == "none"
            cache = environment({INDUCTOR_CACHE: shared})
            with warnings.catch_warnings(record=True) as raised, cache:
                warnings.simplefilter("always")
                meta = export_run(run, path, quantize, compile_aoti="aoti" if default else "none")
            out[f"{name}-{quantize}"] = {
                "path": str(path),
                "meta": meta,
                "warnings": [warning_record(w) for w in raised],
            }
    return out

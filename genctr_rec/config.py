"""Run configuration: dataclasses are the one source of defaults; the CLI is built from them.

A run directory holds ``config.json`` (this, resolved), so ``evaluate``/``export`` rebuild the
exact model without the user repeating flags.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch


class ConfigError(ValueError):
    """A run was asked for something inconsistent (the CLI prints it without a traceback)."""


EMBEDDING_OPTIMIZERS = ("auto", "adam", "rowwise_adagrad", "adagrad", "sgd")
TRANSFERS = ("none", "ps", "decoder", "ps_decoder", "ps_mi")


@dataclass
class ModelConfig:
    """Model shape (paper defaults: width 16, one decoder layer, history 200; our default data
    keeps 50).

    Args:
        dim: embedding and decoder width.
        num_layers: decoder layers.
        num_heads: decoder attention heads.
        decoder: ``conditional`` (CD) or ``sasrec`` (SD).
        lookup: ``pooled`` (EmbeddingBagCollection, bags of one) or ``sequence``.
        dedup: unique ids before each lookup of a table sharded over ranks (shrinks the
            all-to-all; skipped on one rank and for replicated tables, where it only costs).
    """

    dim: int = 16
    num_layers: int = 1
    num_heads: int = 2
    decoder: str = "conditional"
    lookup: str = "pooled"
    dedup: bool = True


@dataclass
class TrainConfig:
    """Optimisation and data settings shared by both stages.

    Args:
        epochs: passes over the data (paper: 3 pre-training, 1 fine-tuning).
        batch_size: examples per rank per step.
        lr: dense learning rate (Adam, paper: 1e-3).
        embedding_optimizer: fused optimizer of the tables; ``auto`` = Adam on CUDA, row-wise
            Adagrad on CPU (fbgemm's CPU kernels have no Adam).
        embedding_lr: learning rate of the fused optimizer (``None``: 1e-3 for Adam, 0.05 for
            the Adagrad family and SGD).
        seed: every random choice (init, shuffling, negatives) follows it.
        sharding: per-table sharding type override, e.g. ``{"item": "row_wise"}``. Otherwise
            one rank holds every table ``table_wise``, small tables are replicated (below) and
            the planner chooses the rest (``training.sharding.default_sharding``).
        replicate_max_mb: with more than one rank, pooled tables of at most this many MB are
            replicated (``data_parallel``) unless ``sharding`` names them: a small table costs
            less to all-reduce than to route every id through the all-to-all and back.
        max_history: history truncation (``None``: the dataset's ``max_history``).
        num_negatives: negatives per pre-training target.
        negatives: ``category`` (CS) or ``random`` (RS).
        checkpoint_every: also checkpoint every N steps (0: only at epoch ends).
        keep_checkpoints: how many of the newest checkpoints to keep.
    """

    epochs: int = 1
    batch_size: int = 1024
    lr: float = 1e-3
    embedding_optimizer: str = "auto"
    embedding_lr: float | None = None
    seed: int = 0
    sharding: dict[str, str] = field(default_factory=dict)
    replicate_max_mb: float = 1.0
    max_history: int | None = None
    num_negatives: int = 16
    negatives: str = "category"
    checkpoint_every: int = 200
    keep_checkpoints: int = 2

    def resolved_embedding_optimizer(self, device: torch.device) -> str:
        if self.embedding_optimizer == "auto":
            return "adam" if device.type == "cuda" else "rowwise_adagrad"
        return self.embedding_optimizer

    def resolved_embedding_lr(self, device: torch.device) -> float:
        if self.embedding_lr is not None:
            return self.embedding_lr
        return 1e-3 if self.resolved_embedding_optimizer(device) == "adam" else 0.05


@dataclass
class RunConfig:
    """Everything a run needs to be rebuilt: stage, data, model, training, transfer."""

    stage: str  # "pretrain" or "finetune"
    data: str
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    backbone: str | None = None
    transfer: str = "none"
    init_from: str | None = None
    num_items: int = 0
    num_categories: int = 0
    max_history: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def prepare_run_dir(self, run_dir: Path, is_main: bool) -> None:
        """Create ``run_dir`` with this config, or check that an existing run (being resumed)
        was started with the same one."""
        path = Path(run_dir) / "config.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved != json.loads(json.dumps(self.to_json())):
                changed = sorted(k for k in saved if saved.get(k) != self.to_json().get(k))
                raise ConfigError(
                    f"{run_dir} holds a run with a different configuration "
                    f"(differs in {changed}); use another --out"
                )
        elif is_main:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.save(run_dir)

    def save(self, run_dir: Path) -> None:
        from genctr_rec.data.writer import atomic_write_json

        atomic_write_json(Path(run_dir) / "config.json", self.to_json())

    @classmethod
    def load(cls, run_dir: str | Path) -> RunConfig:
        path = Path(run_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: is {run_dir} a genctr run directory?")
        raw = json.loads(path.read_text())
        raw["model"] = ModelConfig(**raw["model"])
        raw["train"] = TrainConfig(**raw["train"])
        return cls(**raw)

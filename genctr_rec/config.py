"""Run configuration: dataclasses are the one source of defaults; the CLI is built from them.

A run directory holds ``config.json`` (this, resolved), so ``evaluate``/``export`` rebuild the
exact model without the user repeating flags.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from genctr_rec.storage import location, write_json

if TYPE_CHECKING:  # torch is not imported for `genctr -h`
    import torch


class ConfigError(ValueError):
    """A run was asked for something inconsistent (the CLI prints it without a traceback)."""


EMBEDDING_OPTIMIZERS = ("auto", "adam", "rowwise_adagrad", "adagrad", "sgd")
BACKBONE_NAMES = ("dnn", "dcnv2", "dcnv2_ta")
DECODERS = ("conditional", "sasrec")
NEGATIVES = ("category", "random")
LOOKUPS = ("pooled", "sequence")
CONTEXT_FUSIONS = ("concat", "residual", "product")
DECODER_LAYOUTS = ("auto", "padded", "groups", "packed")
DECODER_KERNELS = ("projection_free", "sdpa")  # how g(s, c) attends with one query a row
# bf16 autocast pays on CUDA from this history cap: the crossover against fp32 lies between the
# caps 200 and 500 (benchmarks/results/decoder_cost_cuda.md)
BF16_MIN_HISTORY = 320
PRECISIONS = ("auto", "fp32", "bf16")
SELECT_ON = ("auc", "logloss")  # fine-tuning's selection figure
CALIBRATIONS = ("platt", "none")
# transfer -> which pre-trained state fine-tuning inherits (table 1 of the paper)
TRANSFERS = ("none", "ps", "decoder", "ps_decoder", "ps_mi")
DECODER_TRANSFERS = ("decoder", "ps_decoder", "ps_mi")  # the CTR model holds a decoder
SHARED_TABLE_PREFIXES = ("embeddings.tables.item.", "embeddings.tables.category.")
TRANSFER_PREFIXES: dict[str, tuple[str, ...]] = {
    "ps": SHARED_TABLE_PREFIXES,
    "ps_decoder": SHARED_TABLE_PREFIXES,
    "ps_mi": (*SHARED_TABLE_PREFIXES, "decoder."),
}
# the resolved defaults of each stage (TrainConfig fields left None)
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": {"epochs": 20, "batch_size": 32, "patience": 2, "evals_per_epoch": 1},
    "finetune": {"epochs": 10, "batch_size": 1024, "patience": 3, "evals_per_epoch": 4},
}


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
        side_features: the CTR model reads user_id (its own table; unseen users share a
            default row) and the side features meta.json declares.
        context_fusion: how g(s, c) joins the final layer: concat (the paper's reading),
            residual (g's weights start at zero) or product (residual plus g * e(target item),
            the pre-training score).
        context_dropout: dropout on g(s, c) while fine-tuning.
        decoder_layout: how the decoder runs a batch of histories of different lengths:
            ``padded`` (to the longest row), ``groups`` (rows of similar length together),
            ``packed`` (one sequence, FlexAttention on CUDA; on CPU a dense mask quadratic in
            the batch's total length, for small batches) or ``auto``, the fastest measured on
            the device (``models.decoder.choose_layout``). Same outputs every way.
        decoder_kernel: how the padded and grouped layouts attend with one query a row
            (g(s, c)): ``projection_free`` (the query folded into the key projection, the
            memory never projected) or ``sdpa``, the reference (the memory projected, then
            SDPA): same outputs, for checking a new layout or kernel against.
    """

    dim: int = 16
    num_layers: int = 1
    num_heads: int = 2
    decoder: str = "conditional"
    lookup: str = "pooled"
    dedup: bool = True
    side_features: bool = True
    context_fusion: str = "product"
    context_dropout: float = 0.0
    decoder_layout: str = "auto"
    decoder_kernel: str = "projection_free"


@dataclass
class TrainConfig:
    """Optimisation and data settings shared by both stages.

    Args:
        epochs: most passes over the data; validation stops earlier (default: pre-training
            20, fine-tuning 10).
        steps: stop after this many optimizer steps instead (0: epochs decide).
        batch_size: examples per rank per step (default: pre-training 32, fine-tuning 1024).
        lr: dense learning rate (Adam, paper: 1e-3).
        decoder_lr: Adam learning rate of an inherited decoder while fine-tuning
            (default: lr).
        valid_fraction: fine-tuning validation: a valid/ split when the dataset has one,
            else the newest fraction of train/ by timestamp (0: no validation, no selection;
            in pre-training 0 turns off the validation on the held-out last clicks).
        eval_every: validate every N steps (0: ``evals_per_epoch`` decides).
        evals_per_epoch: validations an epoch when ``eval_every`` is 0 (always one at each
            epoch end; default: pre-training 1, fine-tuning 4).
        patience: validations without improvement before training stops (0: never; default
            pre-training 2, fine-tuning 3). The best checkpoint is what the run keeps.
        min_epochs: patience stops nothing before this many epochs are complete: a noisy
            validation cannot end a run before the transfer has had time to pay.
        lr_decay: every learning rate (tables, dense layers, decoder) is multiplied by this at
            each validation without improvement, before patience stops the run (1: off; 0.1 is
            FuxiCTR's reduce-on-plateau).
        select_on: fine-tuning's selection figure on validation: ``auc`` (higher is better)
            or ``logloss`` (lower is better; bids need calibrated scores).
        calibrate: fine-tuning: ``platt`` fits p = sigmoid(a * logit + b) on the validation
            rows after selection (``RUN/calibration.json``); test figures, ``genctr evaluate``
            and the exported artifact apply it. AUC is unchanged (a > 0), LogLoss and
            calibration improve where the scores were off. ``none`` keeps raw scores.
        refit: fine-tuning: choose the training length on validation (a run of its own in
            ``RUN/selection``), then train again from the same start on every train/ row, the
            validation slice (the newest rows) included, for as many epochs; the run keeps that
            model, uncalibrated (no held-out rows remain). Needs validation carved out of
            train/ (``--valid-fraction`` above 0, no valid/ split).
        embedding_optimizer: fused optimizer of the tables; ``auto`` = Adam on CUDA, row-wise
            Adagrad on CPU (fbgemm's CPU kernels have no Adam).
        embedding_lr: learning rate of the fused optimizer (``None``: 1e-3 for Adam, 0.05 for
            the Adagrad family and SGD).
        inherited_tables_lr: fine-tuning: the learning rate of the item and category tables
            inherited from pre-training (``ps``, ``ps_decoder``, ``ps_mi``); 0 freezes them
            (GPSD's frozen sparse transfer: ``--transfer ps --inherited-tables-lr 0``);
            ``None``: ``embedding_lr``, like every other table.
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
        prefetch: training batches decoded ahead on a background thread while the model
            steps (0: decode on the training thread; default: 2 on CUDA, where the thread
            decodes while the host waits for the GPU, 0 on CPU, where the step already keeps
            every core busy and the thread only competes with it: benchmarks/README.md).
            Checkpoints record the batches trained on, so resuming is exact either way.
        precision: ``fp32`` or ``bf16`` (``torch.autocast`` over the forward: weights,
            optimizer state and the loss stay fp32); ``auto``: bf16 on CUDA from the history
            cap where it pays (config.BF16_MIN_HISTORY; below it a GPU step is launch-bound
            and the casts cost more than they save: benchmarks/results/decoder_cost_cuda.md),
            else fp32.
        compile: fine-tuning only: compile the backbone and the decoder's g(s, c) with
            torch.compile (histories padded to the cap, one graph for every full batch; same
            losses). A one-time compile against a cheaper step: for long jobs
            (benchmarks/results/finetune_speed.md, genctr_rec/training/compiled.py).
    """

    epochs: int | None = None
    steps: int = 0
    batch_size: int | None = None
    lr: float = 1e-3
    decoder_lr: float | None = None
    valid_fraction: float = 0.1
    eval_every: int = 0
    evals_per_epoch: int | None = None
    patience: int | None = None
    min_epochs: int = 0
    lr_decay: float = 1.0
    select_on: str = "auc"
    calibrate: str = "platt"
    refit: bool = False
    embedding_optimizer: str = "auto"
    embedding_lr: float | None = None
    inherited_tables_lr: float | None = None
    seed: int = 0
    sharding: dict[str, str] = field(default_factory=dict)
    replicate_max_mb: float = 1.0
    max_history: int | None = None
    num_negatives: int = 16
    negatives: str = "category"
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    prefetch: int | None = None
    precision: str = "auto"
    compile: bool = False

    def resolve(self, stage: str) -> TrainConfig:
        """Fill the fields left None with the stage's defaults (in place; returns self)."""
        for name, value in STAGE_DEFAULTS[stage].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if not 0 <= self.valid_fraction < 1:
            raise ConfigError(f"--valid-fraction must be in [0, 1), got {self.valid_fraction}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if self.inherited_tables_lr is not None and self.inherited_tables_lr < 0:
            raise ConfigError("--inherited-tables-lr must not be negative")
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"--lr-decay must be in (0, 1], got {self.lr_decay}")
        if self.evals_per_epoch <= 0:
            raise ConfigError("--evals-per-epoch must be positive")
        if self.select_on not in SELECT_ON:
            raise ConfigError(f"--select-on must be one of {SELECT_ON}, got {self.select_on!r}")
        if self.calibrate not in CALIBRATIONS:
            raise ConfigError(f"--calibrate must be one of {CALIBRATIONS}, got {self.calibrate!r}")
        for name in ("patience", "eval_every", "steps", "min_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must not be negative")
        return self

    def resolved_precision(self, device: torch.device, max_history: int) -> str:
        if self.precision != "auto":
            return self.precision
        long_history = max_history >= BF16_MIN_HISTORY
        return "bf16" if device.type == "cuda" and long_history else "fp32"

    def resolved_embedding_optimizer(self, device: torch.device) -> str:
        if self.embedding_optimizer == "auto":
            return "adam" if device.type == "cuda" else "rowwise_adagrad"
        return self.embedding_optimizer

    def resolved_embedding_lr(self, device: torch.device) -> float:
        if self.embedding_lr is not None:
            return self.embedding_lr
        return 1e-3 if self.resolved_embedding_optimizer(device) == "adam" else 0.05


def absolute_location(location: str | Path) -> str:
    """A local path made absolute (symlinks resolved); a URL (``scheme://...``) as given."""
    text = str(location)
    return text if "://" in text else str(Path(text).expanduser().resolve())


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
    features: dict[str, Any] | None = None  # FeatureSchema.to_json(), resolved at start
    warm_start: str | None = None  # the run this one continues (training/warm_start.py)
    lineage: list[str] = field(default_factory=list)  # every warm start of the chain, oldest first
    raw_ids: list[str] = field(default_factory=list)  # id spaces mapped by RUN/id_maps
    dense_data: str | None = None  # RUN/dense-data, the dense view of a raw-id dataset

    @property
    def reads(self) -> str:
        """The dataset the readers read: the dense view of a raw-id dataset, else ``data``."""
        return self.dense_data or self.data

    def dataset_for(self, data: str | Path | None) -> str | Path:
        """The dataset a command reads for this run: ``data``, else the run's own (its dense
        view for raw ids). A raw-id run reads its own dataset only: another day's ids are not
        in its maps (warm-start a run on it, or export and score through the predictor)."""
        if self.raw_ids and data is not None and absolute_location(data) != self.data:
            raise ConfigError(
                f"{self.data} declares raw ids: this run reads its own dataset only, not "
                f"{data} (warm-start a run on it, or export this one and score it through the "
                "predictor, where unknown ids read default rows)"
            )
        return self.reads if data is None or self.raw_ids else data

    def __post_init__(self) -> None:
        self.train.resolve(self.stage)
        # absolute, so that a run read from another directory (export, evaluate, --init-from)
        # finds its data, and a resume names the same directory however it is spelt
        self.data = absolute_location(self.data)
        if self.init_from:
            self.init_from = absolute_location(self.init_from)
        if self.warm_start:
            self.warm_start = absolute_location(self.warm_start)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, run_dir: Path) -> None:
        write_json(location(run_dir) / "config.json", self.to_json())

    @classmethod
    def load(cls, run_dir: str | Path) -> RunConfig:
        path = location(run_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: is {run_dir} a genctr run directory?")
        raw = json.loads(path.read_text())
        raw["model"] = ModelConfig(**raw["model"])
        raw["train"] = TrainConfig(**raw["train"])
        return cls(**raw)

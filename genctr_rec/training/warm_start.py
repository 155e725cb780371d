"""Warm start: today's run begins from yesterday's selected model on a grown catalogue.

``genctr finetune|pretrain --warm-start PREV_RUN`` builds the model for today's dataset (its
item, category, user and feature vocabularies may be larger than PREV's: ids are stable, new
ones are appended), then loads PREV's selected model and its optimizer state
(``PREV/checkpoint``, written with ``optim`` since 0.11) through DCP. Every table row PREV had
keeps its value and its optimizer state (row-wise Adagrad's sum, Adam's moments); rows past
PREV's vocabulary keep the fresh initialisation and zero optimizer state a fresh run gives
them. Because the load goes through DCP's resharding reads, PREV may have been trained at any
world size and sharding plan, on local disk or object storage.

The only thing DCP refuses is a size change, so ``checkpoint.GrowingLoadPlanner`` lets a table's
tensors (keys under ``embeddings.tables.``) grow along rows: it reads the rows both have and
leaves the rest. Anything else of another shape, a table that shrank, or a missing key is
one error line naming the tensor.

Model settings (``ModelConfig``, backbone, transfer, history length) are PREV's: a flag that
contradicts them is an error; training settings are today's. ``config.json`` records
``warm_start`` and ``lineage`` (every run of the chain, oldest first).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from genctr_rec.checkpoint import MODEL_KEY, _metadata_reader, load_grown
from genctr_rec.config import ConfigError, ModelConfig, RunConfig, absolute_location
from genctr_rec.storage import location

logger = logging.getLogger(__name__)
OPTIM_KEY = "optim"
SELECTED_DIR = "checkpoint"


# what a warm start inherits from the previous run (the model's shape and inputs)
INHERITED = ("backbone", "transfer", "max_history")


def inherit(cfg: RunConfig, previous: str | Path, explicit: dict[str, Any]) -> RunConfig:
    """Make ``cfg`` continue ``previous``: its model settings, lineage and a vocabulary check.

    ``explicit`` holds the settings the user gave on the command line (name -> value); one
    that contradicts the previous run is a ConfigError. Returns the previous run's config.
    """
    prev = RunConfig.load(previous)
    if prev.stage != cfg.stage:
        raise ConfigError(
            f"--warm-start {previous} is a {prev.stage} run; a {cfg.stage} run warm-starts "
            f"from a {cfg.stage} run"
        )
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for name, value in explicit.items():
        theirs = getattr(prev.model, name) if name in model_fields else getattr(prev, name, value)
        if name in model_fields or name in INHERITED:
            if value is not None and value != theirs:
                raise ConfigError(
                    f"--{name.replace('_', '-')} {value} contradicts --warm-start {previous}, "
                    f"which has {theirs}: a warm start keeps the previous run's model settings"
                )
    cfg.model = dataclasses.replace(prev.model)
    cfg.backbone, cfg.transfer, cfg.init_from = prev.backbone, prev.transfer, prev.init_from
    cfg.max_history = prev.max_history
    for what, now, before in (
        ("items", cfg.num_items, prev.num_items),
        ("categories", cfg.num_categories, prev.num_categories),
    ):
        if now < before:
            raise ConfigError(
                f"{cfg.data} has {now} {what}, --warm-start {previous} was trained on {before}: "
                "a catalogue may grow between runs (ids stable), never shrink"
            )
    cfg.warm_start = absolute_location(previous)
    cfg.lineage = [*prev.lineage, cfg.warm_start]
    return prev


def check_features(prev: RunConfig, cfg: RunConfig) -> None:
    """The same declared features as the previous run, each of the same kind; vocabularies
    (and the user count) may only grow; dense features keep the previous run's
    standardisation. Call once ``cfg.features`` is resolved."""
    if prev.features is None or cfg.features is None:
        if (prev.features is None) != (cfg.features is None):
            raise ConfigError(
                f"--warm-start {cfg.warm_start} was trained "
                f"{'without' if prev.features is None else 'with'} side features, this run "
                f"{'with' if prev.features is None else 'without'}: a warm start keeps the "
                "model's inputs"
            )
        return
    before, after, previous = prev.features, cfg.features, cfg.warm_start

    def specs(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {f["name"]: f for f in raw.get("features", [])}

    old, new = specs(before), specs(after)
    if sorted(old) != sorted(new) or any(old[n]["kind"] != new[n]["kind"] for n in old):
        raise ConfigError(
            f"the dataset declares features {sorted(new)}, --warm-start {previous} was trained "
            f"with {sorted(old)} (of the same kinds): a warm start keeps the model's inputs"
        )
    for name in old:
        if (new[name].get("vocab_size") or 0) < (old[name].get("vocab_size") or 0):
            raise ConfigError(
                f"feature {name}: vocab_size {new[name]['vocab_size']} is smaller than the "
                f"{old[name]['vocab_size']} of --warm-start {previous}"
            )
    if (after.get("num_users") or 0) < (before.get("num_users") or 0):
        raise ConfigError(
            f"num_users {after.get('num_users')} is smaller than the {before.get('num_users')} "
            f"of --warm-start {previous}"
        )
    # the dense features keep the standardisation the model learned with
    after["dense_stats"] = before.get("dense_stats", {})


def warm_start_model(built: Any, previous: str | Path) -> None:
    """Collective: ``built`` (a freshly built stage model) takes the previous run's selected
    model and optimizer state; new rows keep their fresh initialisation."""
    path = location(previous) / SELECTED_DIR
    keys = _metadata_reader(path).read_metadata().state_dict_metadata
    built.dense_optimizer.init_state()  # Adam's state must exist to be loaded into
    state = built.app_state()
    if not any(k.startswith(f"{OPTIM_KEY}.") for k in keys):
        logger.warning(
            "--warm-start %s: its selected model has no optimizer state (written before "
            "genctr-rec 0.11): the optimizer starts fresh",
            previous,
        )
        state = {MODEL_KEY: state[MODEL_KEY]}
    grown = load_grown(state, path)
    built.load_app_state(state)
    tables = sorted({_table_of(k): after[0] for k, (_, after) in grown.items()}.items())
    logger.info(
        "warm start from %s: %s",
        previous,
        ", ".join(f"{t} grew to {rows} rows" for t, rows in tables) or "no table grew",
    )


def _table_of(fqn: str) -> str:
    from genctr_rec.checkpoint import GROWABLE

    rest = fqn.split(GROWABLE, 1)[-1]
    return rest.split(".", 1)[0]

"""Checkpoints with ``torch.distributed.checkpoint``: sharded, reshardable, atomic, verified.

Every rank writes its own shards; the directory becomes visible under its final name only
after all ranks finished (written as ``NAME.tmp``, renamed by rank 0 after a barrier). On
object storage, which has no rename, a checkpoint is written in place and counts only once its
manifest, written last by rank 0 after every rank finished, is there: readers there require it
(:mod:`genctr_rec.storage`). Loading
goes through DCP as well, so a checkpoint written by any world size or sharding plan loads into
any other; ``prefixes`` loads a subset (stage 2 takes ``embeddings.`` and ``decoder.`` from a
pre-training run).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from genctr_rec.config import ConfigError
from genctr_rec.distributed import from_main
from genctr_rec.storage import (
    Location,
    copy_tree,
    files_under,
    first_line,
    is_remote,
    location,
    make_dirs,
    relative_name,
    remove_tree,
    replace_dir,
    safe_relative,
    sha256,
    write_json,
)

logger = logging.getLogger(__name__)
MODEL_KEY = "model"


def save_model(model: nn.Module, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Collective: every rank calls it. ``path`` appears only once complete, with a manifest of
    its files' sizes and SHA-256 sums that :func:`load_model` verifies. ``extra`` is saved
    beside the model (a run's selected model keeps its optimizer state under ``optim``, so
    that tomorrow's run can warm-start from it: ``training/warm_start.py``).

    The copy it replaces stays whole until the new one is: locally it is renamed aside
    (``NAME.old``) and deleted only after the new one took its name; on object storage the new
    one is written complete under ``NAME.next`` first. A kill at any point leaves a complete
    copy that :func:`recover_saved` puts back under ``NAME``."""
    path = location(path)
    state = {MODEL_KEY: model.state_dict(), **(extra or {})}
    if is_remote(path):
        _save_beside(state, path)
        return
    tmp = path.with_name(path.name + ".tmp")
    rank = _rank()
    if rank == 0:
        recover_saved(path)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    _barrier()
    dcp.save(state, checkpoint_id=str(tmp), no_dist=_one_process())
    _barrier()
    write_manifest_collective(tmp)
    if rank == 0:
        replace_dir(tmp, path)
    _barrier()


def _save_beside(state: dict[str, Any], path: Location) -> None:
    """Object storage (no rename): the new copy is written whole under ``NAME.next`` (manifest
    last), then copied over ``NAME`` (manifest removed first, written again last), then
    ``NAME.next`` is deleted: a kill leaves ``NAME`` or ``NAME.next`` complete."""
    staged = path.with_name(path.name + ".next")
    if _rank() == 0:
        recover_saved(path)
        remove_tree(staged)
    _barrier()
    dcp.save(state, checkpoint_id=str(staged), no_dist=_one_process())
    _barrier()
    write_manifest_collective(staged)
    if _rank() == 0:
        _copy_complete(staged, path)
        remove_tree(staged)
    _barrier()


def _copy_complete(source: Location, target: Location) -> None:
    """Object storage: ``target`` becomes a copy of complete ``source`` (manifest last; the
    old copy loses its manifest first)."""
    (target / MANIFEST).unlink(missing_ok=True)
    remove_tree(target)
    copy_tree(source, target, last=MANIFEST)


def recover_saved(path: str | Path) -> bool:
    """Put back a complete copy a kill left beside ``path`` (a local ``NAME.tmp`` or
    ``NAME.old``, an object-storage ``NAME.next``) when ``path`` itself is missing or has no
    manifest; the newest complete copy wins. Returns whether it recovered one. Safe to race:
    a rename either happens once or finds nothing to do."""
    path = location(path)
    if (path / MANIFEST).is_file():
        return False
    if is_remote(path):
        staged = path.with_name(path.name + ".next")
        if _verifies(staged):
            logger.warning("%s: recovering the complete copy %s a kill left", path, staged)
            _copy_complete(staged, path)
            return True
        return False
    for candidate in (path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")):
        if not _verifies(candidate):
            continue
        logger.warning("%s: recovering the complete copy %s a kill left", path, candidate)
        try:
            if path.exists():  # a copy without its manifest: never complete
                shutil.rmtree(path, ignore_errors=True)
            os.replace(candidate, path)
        except FileNotFoundError:  # another rank recovered it first
            pass
        return True
    return False


def _verifies(path: Location) -> bool:
    try:
        verify_manifest(path)
    except CheckpointError:
        return False
    return True


def load_model(
    model: nn.Module,
    path: str | Path,
    prefixes: Sequence[str] | None = None,
    no_dist: bool = False,
    grow: bool = False,
) -> list[str]:
    """Collective: load ``path`` into ``model`` (all keys, or those under ``prefixes``).

    ``no_dist=True`` loads in this process alone, whatever process group exists (an unsharded
    model, e.g. for export on one rank). Returns the loaded keys. Raises if the checkpoint lacks
    a requested key. ``grow=True`` lets tables have more rows than the checkpoint's (a grown
    catalogue: :class:`GrowingLoadPlanner`).
    """
    path = location(path)
    recover_saved(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no .metadata)")
    verify_manifest(path)  # no manifest: incomplete (or older than 0.3), never read unverified
    check_table_layout(path)
    state = model.state_dict()
    if prefixes is not None:
        state = {k: v for k, v in state.items() if k.startswith(tuple(prefixes))}
        if not state:
            raise KeyError(f"the model has no state under {list(prefixes)}")
    if grow:
        load_grown({MODEL_KEY: state}, path, no_dist)
    else:
        dcp.load({MODEL_KEY: state}, checkpoint_id=str(path), no_dist=no_dist or _one_process())
    model.load_state_dict(state, strict=False)
    logger.info("loaded %d tensors from %s", len(state), path)
    return sorted(state)


def load_state(state: dict[str, Any], path: str | Path) -> None:
    """Collective: load ``state`` (e.g. ``{"model": ..., "optim": ...}``) in place from a
    verified checkpoint written by :func:`save_model` (any world size or plan)."""
    path = location(path)
    recover_saved(path)
    verify_manifest(path)
    dcp.load(state, checkpoint_id=str(path), no_dist=_one_process())


GROWABLE = "embeddings.tables."  # table weights and their optimizer states: rows may grow


class GrowingLoadPlanner(DefaultLoadPlanner):
    """DCP's planner, except that a table tensor may have more rows than the saved one: the
    saved rows are read into the first rows (resharded as usual), the others are untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.grown: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.restarted: list[str] = []

    def create_local_plan(self):
        saved = self.metadata.state_dict_metadata
        for fqn in [k for k in self.state_dict if k not in saved]:
            # a table that moved between the fused optimizer and replication (e.g. one rank
            # yesterday, two today) has its optimizer state under another name: it restarts,
            # as a resharded resume's does (OPTIMIZER_STATE_BOUND); any other key must be there
            if fqn.startswith("optim.") and GROWABLE in fqn:
                del self.state_dict[fqn]
                self.restarted.append(fqn)
        for fqn, obj in self.state_dict.items():
            md = saved.get(fqn)
            if not isinstance(md, TensorStorageMetadata) or not hasattr(obj, "size"):
                continue
            before, after = tuple(md.size), tuple(obj.size())
            if before == after:
                continue
            check_growth(fqn, before, after)
            self.grown[fqn] = (before, after)
            # the size check is DCP's only objection: the reads intersect the saved chunks
            saved[fqn] = dataclasses.replace(md, size=obj.size())
        return super().create_local_plan()


def check_growth(fqn: str, before: tuple[int, ...], after: tuple[int, ...]) -> None:
    """Raise ConfigError unless ``fqn`` is a table tensor that only gained rows."""
    key = fqn.split(".", 1)[-1]
    if GROWABLE not in fqn or len(before) != len(after) or before[1:] != after[1:]:
        raise ConfigError(
            f"the warm-start model's {key} has shape {list(before)}, this run's "
            f"{list(after)}: a warm start keeps the model's shape (only tables may grow)"
        )
    if after[0] < before[0]:
        raise ConfigError(
            f"{key}: the previous run had {before[0]} rows, this dataset's vocabulary has "
            f"{after[0]}: a vocabulary may grow between runs (ids stable), never shrink"
        )


def load_grown(
    app_state: dict[str, Any], path: str | Path, no_dist: bool = False
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Collective: load a checkpoint into ``app_state`` in place, tables allowed to have grown.
    Returns the grown tensors (name -> (saved shape, new shape))."""
    path = location(path)
    recover_saved(path)
    try:
        verify_manifest(path)
    except CheckpointError as exc:
        raise CheckpointError(f"--warm-start: {exc}") from exc
    planner = GrowingLoadPlanner()
    try:
        dcp.load(
            app_state,
            checkpoint_id=str(path),
            planner=planner,
            no_dist=no_dist or _one_process(),
        )
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - DCP wraps every rank's failure
        cause = _config_error_in(exc)
        if cause is not None:
            raise cause from exc
        raise CheckpointError(f"--warm-start {path}: cannot load ({first_line(exc)})") from exc
    if planner.restarted:
        tables = sorted({k.split(GROWABLE, 1)[1].split(".", 1)[0] for k in planner.restarted})
        logger.warning(
            "%s: the optimizer state of %s restarts: the table moved between the fused "
            "optimizer and replication since it was saved",
            path,
            ", ".join(tables),
        )
    return planner.grown


def _config_error_in(exc: BaseException) -> ConfigError | None:
    """DCP re-raises a planner's error wrapped (CheckpointException); find ours inside."""
    for failure in getattr(exc, "failures", {}).values():
        if isinstance(failure, ConfigError):
            return failure
        inner = getattr(failure, "exc", None) or getattr(failure, "exception", None)
        if isinstance(inner, ConfigError):
            return inner
    text = str(exc)
    for marker in ("a warm start keeps", "never shrink"):
        if marker in text:
            line = next(line for line in text.splitlines() if marker in line)
            return ConfigError(line.strip().split("ConfigError: ")[-1])
    return None


# genctr-rec 0.1 kept both tables in one TorchRec module: embeddings.tables.embedding_bags.item
OLD_TABLE_KEYS = (
    f"{MODEL_KEY}.embeddings.tables.embedding_bags.",
    f"{MODEL_KEY}.embeddings.tables.embeddings.",
)


# genctr-rec 0.2 ended every backbone in one linear layer over [h, g]
OLD_HEAD_KEY = "backbone.final.weight"


def _metadata_reader(path: Location):
    if is_remote(path):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(str(path))
    return dcp.FileSystemReader(str(path))


def check_table_layout(path: Location) -> None:
    """Refuse, with the reason, a checkpoint whose tables use 0.1's one-module layout (since
    0.2 every table is its own module, ``embeddings.tables.item.*``): DCP would only report
    missing keys."""
    keys = _metadata_reader(path).read_metadata().state_dict_metadata
    old = sorted(k for k in keys if k.startswith(OLD_TABLE_KEYS))
    if old:
        raise CheckpointError(
            f"{path} was written by genctr-rec 0.1 (both tables in one module, e.g. {old[0]}); "
            "this version keeps each table in its own module (embeddings.tables.item.*). "
            "Re-run the stage that wrote it, or read it with genctr-rec 0.1."
        )
    if f"{MODEL_KEY}.{OLD_HEAD_KEY}" in keys:
        raise CheckpointError(
            f"{path} is a fine-tuning checkpoint of genctr-rec 0.2 ({OLD_HEAD_KEY}); since 0.3 "
            "the backbones end in a ContextHead and read user and side features. Re-run the "
            "fine-tuning (its pre-training run still loads), or read it with genctr-rec 0.2."
        )


MANIFEST = "manifest.json"
PROGRESS = "progress.json"
STEP_DIR = re.compile(r"^step-(\d{9})$")


class CheckpointError(RuntimeError):
    """A checkpoint is damaged or could not be written; the message says which and why."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _one_process() -> bool:
    """DCP's collectives are skipped in a one-process job. They would exchange every tensor's
    metadata through gloo, whose worker thread then copies a large buffer with OpenMP: a second
    OpenMP team, after which libgomp stops spin-waiting (more threads than cores) and every
    later training step runs slower (benchmarks/README.md). A multi-process job under torchrun
    runs one OpenMP thread a rank."""
    return not dist.is_initialized() or dist.get_world_size() == 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def collective_device(backend: str) -> torch.device:
    """Where a tensor for a collective of ``backend`` must live: nccl reduces CUDA tensors
    only (this rank's GPU), gloo and the rest CPU tensors."""
    if backend == "nccl":
        return torch.device("cuda")  # the current device, set per rank at start-up
    return torch.device("cpu")


def _all_ok(ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank (a failed rank makes all ranks fail)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([0 if ok else 1], device=collective_device(dist.get_backend()))
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def _entries(directory: Location, files: list[Location]) -> dict[str, dict[str, Any]]:
    return {
        relative_name(p, directory): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files
    }


def write_manifest(directory: Location) -> None:
    """Sizes and SHA-256 sums of every file under ``directory``: written last, it is what makes
    the directory a complete checkpoint."""
    files = [p for p in files_under(directory) if p.name != MANIFEST]
    write_json(directory / MANIFEST, {"files": _entries(directory, files)})  # tmp + rename


_RANK_FILE = re.compile(r"^(?:__(\d+)_\d+\.distcp|rng-rank(\d+)\.pt)$")


def write_manifest_collective(directory: Location) -> None:
    """Collective :func:`write_manifest`: every rank hashes the files it wrote (its DCP shards,
    its RNG state), rank 0 the shared ones, and rank 0 writes the manifest. A large checkpoint
    is hashed in the time of one rank's share, not of the whole while the others wait."""
    if _one_process():
        write_manifest(directory)
        return
    rank, world = _rank(), dist.get_world_size()
    mine = []
    for p in files_under(directory):
        if p.name == MANIFEST:
            continue
        match = _RANK_FILE.match(p.name)
        owner = int(next(g for g in match.groups() if g is not None)) if match else 0
        if owner % world == rank:
            mine.append(p)
    gathered: list[Any] = [None] * world if rank == 0 else []
    dist.gather_object(_entries(directory, mine), gathered if rank == 0 else None, dst=0)
    if rank == 0:
        entries = {name: entry for part in gathered for name, entry in part.items()}
        write_json(directory / MANIFEST, {"files": dict(sorted(entries.items()))})


def verify_manifest(directory: Location, checksums: bool = True) -> None:
    """Raise :class:`CheckpointError` naming the first missing, resized or altered file."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST}; the checkpoint is incomplete")
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"{manifest}: unreadable manifest ({exc})") from exc
    for name, entry in entries.items():
        try:
            path = directory / safe_relative(name)
        except ValueError as exc:
            raise CheckpointError(f"{manifest}: {exc}") from exc
        if not path.is_file():
            raise CheckpointError(f"{directory}: {name} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise CheckpointError(
                f"{directory}: {name} has {path.stat().st_size} bytes, "
                f"the manifest says {entry['bytes']}"
            )
        if checksums and sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{directory}: {name} fails its SHA-256 check")


# Moving a table between these layouts and any other cannot carry its optimizer state: fbgemm
# keeps row-wise Adagrad state per row (a column-wise shard has a different one), and a
# replicated table is stepped by the dense optimizer, not the fused one
OPTIMIZER_STATE_BOUND = frozenset({"column_wise", "table_column_wise", "data_parallel"})


def optimizer_cannot_move(
    saved: dict[str, str] | None, current: dict[str, str] | None
) -> list[str]:
    """The tables (``name: saved -> current``) whose optimizer state cannot follow a change of
    sharding; empty when the plans are unknown or every change is one DCP reshards."""
    if not saved or not current:
        return []
    return [
        f"{table}: {saved[table]} -> {kind}"
        for table, kind in sorted(current.items())
        if table in saved and saved[table] != kind and OPTIMIZER_STATE_BOUND & {saved[table], kind}
    ]


class CheckpointManager:
    """Training checkpoints under ``RUN/checkpoints/step-NNNNNNNNN``, the last ``keep`` kept.

    A checkpoint holds the model (sharded tables and dense part), the fused and dense optimizer
    states (all through DCP, so any world size or plan can load them), and per run the
    progress (epoch, step, reader position, running loss) and per rank the RNG states. It is
    written under ``step-N.tmp``, given a manifest of sizes and SHA-256 sums (each rank hashes
    its own files), and renamed only when every rank finished: a run killed mid-save leaves the
    previous one intact. A step saved again (a resume that stops where it started) sets the
    old copy aside before the new one takes its name, and a resume puts back whichever
    complete copy a kill left. On object storage it is written whole under ``step-N.next`` and
    then copied under its name, complete once its manifest (copied last) is there; one without
    it is skipped on resume.
    """

    def __init__(self, run_dir: str | Path, keep: int = 2, every_steps: int = 0) -> None:
        self.root = location(run_dir) / "checkpoints"
        self.keep = max(1, keep)
        self.every_steps = every_steps

    def checkpoints(self) -> list[Location]:
        if not self.root.is_dir():
            return []
        return sorted(
            (p for p in self.root.iterdir() if STEP_DIR.match(p.name)), key=lambda p: p.name
        )

    def _recover(self) -> None:
        """A step whose save or re-save a kill interrupted (``step-N.tmp`` or ``.next``
        complete, ``step-N.old`` the copy it replaced, ``step-N`` gone or without manifest):
        the newest complete copy takes the name."""
        if not self.root.is_dir():
            return
        for leftover in self.root.iterdir():
            match = re.match(r"^(step-\d{9})\.(tmp|old|next)$", leftover.name)
            if match:
                recover_saved(self.root / match.group(1))

    def latest(self) -> Location | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def newest_valid(self) -> Location | None:
        """Collective: the newest checkpoint whose files match its manifest (rank 0 checks,
        every rank gets the answer). Damaged newer ones are skipped with a warning naming the
        file and the reason; None when there are none; CheckpointError when every one is
        damaged (training from scratch over a run's checkpoints must be the user's choice)."""
        chosen, skipped = None, []
        if _rank() == 0:
            self._recover()
            for path in reversed(self.checkpoints()):
                if is_remote(path) and not (path / MANIFEST).is_file():
                    # a copy that never finished (object storage cannot rename): like a
                    # local .tmp directory, not a checkpoint yet
                    logger.warning("ignoring %s: its save did not finish (no manifest)", path)
                    continue
                try:
                    verify_manifest(path)
                    check_table_layout(path)
                except CheckpointError as exc:
                    skipped.append(str(exc))
                    logger.warning("skipping checkpoint %s: %s", path.name, exc)
                    continue
                chosen = path.name
                break
        chosen, skipped = from_main((chosen, skipped))
        if chosen is None and skipped:
            raise CheckpointError(
                f"no checkpoint under {self.root} can be resumed ({'; '.join(skipped)}); "
                f"delete {self.root} to train from the start"
            )
        if chosen is not None and skipped:
            logger.warning("resuming from %s, the newest valid checkpoint", chosen)
        return self.root / chosen if chosen is not None else None

    def save(
        self, step: int, app_state: dict[str, Any], progress: dict[str, Any], rng: dict[str, Any]
    ) -> Location:
        """Collective. Returns the committed directory; raises CheckpointError on any rank's
        failure, leaving earlier checkpoints untouched."""
        final = self.root / f"step-{step:09d}"
        # written whole beside its final name first: renamed into place on disk; copied over
        # on object storage, which cannot rename (complete once its manifest is there)
        tmp = final.with_name(final.name + (".next" if is_remote(final) else ".tmp"))
        rank = _rank()
        error: BaseException | None = None
        try:
            if rank == 0:
                remove_tree(tmp)
                make_dirs(tmp)
        except OSError as exc:
            error = exc
        if not _all_ok(error is None):
            raise CheckpointError(f"cannot create {tmp}: {error or 'failed on rank 0'}")
        try:
            dcp.save(app_state, checkpoint_id=str(tmp), no_dist=_one_process())
            with (tmp / f"rng-rank{rank}.pt").open("wb") as handle:
                torch.save(rng, handle)
            if rank == 0:
                (tmp / PROGRESS).write_text(json.dumps(progress, indent=1, sort_keys=True))
        except (Exception, CheckpointException) as exc:  # every failure must reach every rank
            error = exc
        if _all_ok(error is None):
            try:
                write_manifest_collective(tmp)  # each rank hashes what it wrote
                if rank == 0 and is_remote(final):
                    _copy_complete(tmp, final)
                    remove_tree(tmp)
                elif rank == 0:
                    replace_dir(tmp, final)  # a step saved again: the old copy set aside
            except OSError as exc:
                error = exc
        if not _all_ok(error is None):
            if rank == 0:
                remove_tree(tmp)
            raise CheckpointError(
                f"saving checkpoint step {step} under {self.root} failed: "
                f"{error or 'another rank failed'}; the previous checkpoint is untouched"
            ) from error
        if rank == 0:
            for old in self.checkpoints()[: -self.keep]:
                remove_tree(old)
        _barrier()
        logger.info("checkpoint %s written", final)
        return final

    def load(
        self,
        path: Location,
        app_state: dict[str, Any],
        plan: dict[str, str] | None = None,
        resettable: Sequence[str] = ("optim",),
        verified: bool = False,
    ) -> tuple[dict[str, Any], dict | None]:
        """Collective: verify (unless ``verified``), load ``app_state`` in place; returns
        (progress, this rank's RNG states or None when the world size changed).

        ``plan`` is this model's table -> sharding type. The entries named in ``resettable``
        (the optimizer) are left as they are, with a warning, only where resharding is known to
        need it (:func:`optimizer_cannot_move`); any other failure to load is an error that
        names the checkpoint, never a silent restart of the optimizer.
        """
        if not verified:
            verify_manifest(path)
            check_table_layout(path)
        progress = json.loads((path / PROGRESS).read_text())
        try:
            dcp.load(app_state, checkpoint_id=str(path), no_dist=_one_process())
        except (Exception, CheckpointException) as exc:
            kept = {k: v for k, v in app_state.items() if k not in resettable}
            moved = optimizer_cannot_move(progress.get("sharding"), plan)
            if len(kept) == len(app_state) or not moved:
                raise CheckpointError(f"{path}: cannot load ({first_line(exc)})") from exc
            try:
                dcp.load(kept, checkpoint_id=str(path), no_dist=_one_process())
            except (Exception, CheckpointException) as exc2:
                raise CheckpointError(f"{path}: cannot load ({first_line(exc2)})") from exc2
            app_state["resharding_reset"] = list(resettable)
            logger.warning(
                "%s: %s restarts: its state cannot move between these layouts (%s); "
                "the model loaded in full",
                path,
                ", ".join(resettable),
                ", ".join(moved),
            )
        progress = json.loads((path / PROGRESS).read_text())
        rng_file = path / f"rng-rank{_rank()}.pt"
        same_world = progress.get("world_size") == (
            dist.get_world_size() if dist.is_initialized() else 1
        )
        rng = None
        if same_world and rng_file.is_file():
            with rng_file.open("rb") as handle:
                try:  # tensors and numbers only: unpickling runs no code
                    rng = torch.load(handle, weights_only=True)
                except Exception as exc:  # noqa: BLE001 - pickle's errors are many
                    logger.warning(
                        "%s holds more than tensors and numbers (written before genctr-rec "
                        "0.11, or altered), so it is not unpickled: the random streams start "
                        "afresh and this resume is not bit for bit (%s)",
                        rng_file,
                        first_line(exc),
                    )
        return progress, rng

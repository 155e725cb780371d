"""A training run's directory: checked, locked, configured, before any work is done.

``open_run`` is what every stage enters first (rank 0 acts, every rank gets the same outcome):

1. ``--out`` must be a run directory of ours (``config.json``), an empty directory, or not exist:
   a directory of somebody else's files is refused rather than mixed with ours.
2. It must be writable: a clear error names it otherwise, once, not one traceback a rank.
3. It is locked (``RUN/.lock``: host, pid, process start time, job id, start date) for as long
   as the stage runs, so that two jobs never train into the same directory. A lock left by a
   dead process on this host is stale and taken over (and said so); a restart of the same
   torchrun / torchx job (same ``TORCHELASTIC_RUN_ID``) takes over its own lock on any host; a
   lock held elsewhere is refused with how to clear it. On object storage (``--out s3://...``)
   the lock is an object, checked then written: it stops the usual mistake (a second job
   started into a running job's prefix), not two jobs started in the same second.
4. Its ``config.json`` is written, or compared with the existing run's for a resume. A run that
   never wrote a checkpoint has nothing to resume: its configuration is replaced (a dataset
   rejected at its first row group, corrected at another path, then runs in the same ``--out``).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from genctr_rec.config import ConfigError, absolute_location
from genctr_rec.distributed import DistContext, from_main
from genctr_rec.storage import (
    Location,
    describe_error,
    file_lock,
    is_remote,
    location,
    make_dirs,
)

logger = logging.getLogger(__name__)
LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
SAVED_STATE = ("checkpoints", "checkpoint", "best")  # what a resume or a reader would use
JOB_ID_VARIABLES = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID")
# values that name no job: torchrun's static rendezvous sets TORCHELASTIC_RUN_ID=none for
# every job, so two unrelated jobs would pass as restarts of one
NOT_A_JOB_ID = frozenset({"", "none", "null", "default"})


class RunDirError(ConfigError):
    """``--out`` cannot be used as this run's directory; the message says why and what to do."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), to tell a live owner from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's live process
        return True
    now = _process_start(pid)
    return started is None or now is None or now == started


@dataclass(frozen=True)
class LockOwner:
    host: str
    pid: int
    process_start: str | None
    job: str | None
    since: str

    @classmethod
    def me(cls) -> LockOwner:
        job = next(
            (
                os.environ[v]
                for v in JOB_ID_VARIABLES
                if os.environ.get(v, "").strip().lower() not in NOT_A_JOB_ID
            ),
            None,
        )
        since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()), job, since)

    def describe(self) -> str:
        job = f", job {self.job}" if self.job else ""
        return f"pid {self.pid} on {self.host}{job}, since {self.since}"


class RunLock:
    """``RUN/.lock``, created exclusively; :meth:`release` removes it if it is still ours."""

    def __init__(self, run_dir: Location) -> None:
        self.path = run_dir / LOCK_FILE
        self.owner = LockOwner.me()

    def _read(self) -> LockOwner | None:
        try:
            return LockOwner(**json.loads(self.path.read_text()))
        except (OSError, ValueError, TypeError):
            return None  # vanished, or half-written by a writer killed mid-write

    def _write(self, exclusive: bool) -> None:
        """Publish our owner record whole: written to a temporary file first, then linked
        (``exclusive``: fails if a lock exists) or renamed over the lock, so that no reader
        ever sees a lock file without its content."""
        text = json.dumps(asdict(self.owner), indent=1)
        if is_remote(self.path):  # no exclusive create on object storage: check, then write
            if exclusive and self.path.exists():
                raise FileExistsError(str(self.path))
            self.path.write_text(text)
            return
        tmp = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            if exclusive:
                os.link(tmp, self.path)  # atomic: the lock appears complete, or not at all
            else:
                os.replace(tmp, self.path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def acquire(self) -> None:
        if is_remote(self.path):
            self._acquire()
            return
        # one process at a time decides about an existing lock (two that both found it stale
        # would both take it over); the kernel drops the flock if its holder dies
        with file_lock(self.path.with_name(f"{LOCK_FILE}.guard")):
            self._acquire()

    def _acquire(self) -> None:
        try:
            self._write(exclusive=True)
            return
        except FileExistsError:
            pass
        holder = self._read()
        me = self.owner
        if holder is None:
            reason = "unreadable lock file (written by genctr-rec before 0.11, killed mid-write)"
        elif holder.job is not None and holder.job == me.job:
            reason = f"a restart of the same job ({holder.describe()})"
        elif holder.host == me.host and not _alive(holder.pid, holder.process_start):
            reason = f"stale lock: {holder.describe()} is not running"
        elif holder.host == me.host and holder.pid == me.pid:
            reason = "already held by this process"
        else:
            where = "this host" if holder.host == me.host else holder.host
            raise RunDirError(
                f"{self.path.parent} is in use by {holder.describe()}. Two jobs cannot train "
                f"into one directory: stop that job, or use another --out. If nothing on "
                f"{where} uses it any more, delete {self.path}"
            )
        logger.warning("%s: taking over the lock (%s)", self.path, reason)
        self._write(exclusive=False)

    def release(self) -> None:
        holder = self._read()
        if holder is not None and (holder.host, holder.pid) == (self.owner.host, self.owner.pid):
            self.path.unlink(missing_ok=True)


def has_saved_state(run_dir: Location) -> bool:
    """True when the run wrote anything a resume, an evaluation or an export would read."""
    return any((run_dir / name).exists() for name in SAVED_STATE)


def check_out_dir(run_dir: Location) -> None:
    """Refuse a directory that holds files and is not a run (no ``config.json``)."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise RunDirError(f"--out {run_dir} is a file, not a directory")
    if (run_dir / CONFIG_FILE).is_file():
        return
    foreign = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(LOCK_FILE))
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise RunDirError(
            f"--out {run_dir} holds files that are not a genctr run ({shown}; no {CONFIG_FILE}): "
            "choose an empty or new directory"
        )


def make_writable_dir(run_dir: Location) -> None:
    try:
        make_dirs(run_dir)
        probe = run_dir / f".write-test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except Exception as exc:  # noqa: BLE001 - object storage raises its client's errors
        reason = describe_error(exc)
        if reason is not None:
            raise RunDirError(f"cannot write to --out {run_dir}: {reason}") from exc
        if not isinstance(exc, OSError):
            raise
        raise RunDirError(
            f"cannot write to --out {run_dir}: {exc.strerror or exc}; choose a directory "
            "this user can write"
        ) from exc


def _defaults(section: str) -> dict[str, Any]:
    """The dataclass defaults of a config section (``model`` or ``train``), as JSON."""
    from dataclasses import asdict

    from genctr_rec.config import ModelConfig, TrainConfig

    return json.loads(json.dumps(asdict(ModelConfig() if section == "model" else TrainConfig())))


def _run_default(name: str) -> Any:
    """A RunConfig field's default, as JSON."""
    from dataclasses import MISSING, fields

    from genctr_rec.config import RunConfig

    for f in fields(RunConfig):
        if f.name == name:
            if f.default_factory is not MISSING:
                return f.default_factory()
            return None if f.default is MISSING else f.default
    return None


def write_or_check_config(cfg: Any, run_dir: Location) -> None:
    """Write ``config.json``, or check it equals the saved one when there is a run to resume."""
    path = run_dir / CONFIG_FILE
    current = json.loads(json.dumps(cfg.to_json()))
    if path.is_file():
        saved = json.loads(path.read_text())
        for key in ("data", "init_from"):  # written relative before 0.4
            if saved.get(key):
                saved[key] = absolute_location(saved[key])
        for key in ("model", "train"):  # settings added since the run was written: defaults
            if isinstance(saved.get(key), dict) and isinstance(current.get(key), dict):
                defaults = _defaults(key)
                missing = set(current[key]) - set(saved[key])
                saved[key].update({name: defaults[name] for name in missing if name in defaults})
        for key in set(current) - set(saved):  # top-level fields added since (0.11: lineage)
            saved[key] = _run_default(key)
        if saved == current:
            return
        changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if has_saved_state(run_dir):
            raise RunDirError(
                f"{run_dir} holds a run with a different configuration (differs in "
                f"{changed}); resume it with the same arguments, or use another --out"
            )
        logger.warning(
            "%s: replacing the configuration of a run that never saved a checkpoint "
            "(differs in %s)",
            run_dir,
            changed,
        )
    cfg.save(run_dir)


def _agree(ctx: DistContext, error: str | None) -> None:
    """Every rank raises rank 0's error, or none does."""
    error = from_main(error)
    if error is not None:
        raise RunDirError(error)


@contextmanager
def open_run(cfg: Any, run_dir: str | Path, ctx: DistContext) -> Iterator[Location]:
    """Collective: the checked, locked, configured run directory, unlocked on leaving."""
    run_dir = location(run_dir)
    lock = RunLock(run_dir)
    error = None
    if ctx.is_main:
        try:
            check_out_dir(run_dir)
            make_writable_dir(run_dir)
            lock.acquire()
            try:
                write_or_check_config(cfg, run_dir)
            except BaseException:
                lock.release()
                raise
        except (RunDirError, ConfigError) as exc:
            error = str(exc)
    _agree(ctx, error)
    try:
        yield run_dir
    finally:
        if ctx.is_main:
            lock.release()

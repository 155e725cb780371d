"""Where files live: a local directory or object storage (``s3://bucket/prefix``), one API.

Every path the CLI takes may be a URL. Local paths stay :class:`pathlib.Path`; URLs become
``upath.UPath`` objects backed by fsspec (``s3fs`` for S3), which offer the same methods
(``/``, ``exists``, ``is_file``, ``iterdir``, ``read_text``, ``open``, ``stat``), so the
readers and writers need no second code path. Credentials and the endpoint come the standard
way: the AWS environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``), ``AWS_PROFILE`` / ``~/.aws``, an instance role, and ``AWS_ENDPOINT_URL``
for S3-compatible stores (MinIO, Ceph, moto).

Object storage has no rename: what must appear whole (a checkpoint, an artifact) is written
file by file with its manifest last, and readers of object storage require the manifest
(:mod:`genctr_rec.checkpoint`). One object is written in one PUT, so a JSON file is never
half-written there; on local disk it is written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:  # imported where used: `genctr -h` and local-only runs never load them
    import pyarrow as pa
    import pyarrow.parquet as pq
    from upath import UPath

Location = Union[Path, "UPath"]
# other processes (the other ranks) write under the same prefixes: never trust a cached listing
STORAGE_OPTIONS: dict[str, dict[str, Any]] = {"s3": {"use_listings_cache": False}}


class StorageError(OSError):
    """Object storage refused or could not be reached; the message says which URL and why."""


def is_url(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` other than ``file://``."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def is_remote(path: Location) -> bool:
    """True for a location on object storage (a ``UPath`` that is not a local ``Path``)."""
    return not isinstance(path, Path)


def location(where: str | os.PathLike) -> Location:
    """A local ``Path`` or, for a URL, a ``UPath`` on its fsspec filesystem."""
    if isinstance(where, Path) or type(where).__module__.startswith("upath"):
        return where  # type: ignore[return-value]
    text = str(where)
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    if not is_url(text):
        return Path(text)
    from upath import UPath

    scheme = text.split("://", 1)[0]
    return UPath(text, **STORAGE_OPTIONS.get(scheme, {}))


def fs_path(path: Location) -> tuple[Any, str]:
    """(pyarrow-usable filesystem or None for local, path string) for pyarrow's readers."""
    if isinstance(path, Path):
        return None, str(path)
    return path.fs, path.path


def open_parquet(path: Location) -> pq.ParquetFile:
    """A ParquetFile that reads row groups on demand (ranged GETs on object storage)."""
    import pyarrow.parquet as pq

    filesystem, name = fs_path(path)
    if filesystem is None:
        return pq.ParquetFile(name)
    return pq.ParquetFile(filesystem.open(name, "rb"))


def read_table(path: Location, columns: list[str] | None = None) -> pa.Table:
    import pyarrow.parquet as pq

    filesystem, name = fs_path(path)
    return pq.read_table(name, columns=columns, filesystem=filesystem)


def write_bytes(path: Location, data: bytes) -> None:
    """Write a whole file: temporary name + rename locally, one PUT on object storage."""
    if is_remote(path):
        with path.open("wb") as handle:
            handle.write(data)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        shared_permissions(Path(tmp))  # mkstemp's 0600 would hide it from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Location, obj: Any) -> None:
    """The one JSON writer: whole (:func:`write_bytes`), indented, keys sorted."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def check_replaceable(
    target: str | os.PathLike, overwrite: bool, marker: str | None = None
) -> None:
    """Refuse an existing ``target`` unless ``overwrite``; and even then, unless it holds
    ``marker`` (the file our own tool writes there): --overwrite replaces what we wrote, never
    a directory of the user's."""
    target = location(target)
    if not target.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    if marker is not None and not (target / marker).is_file():
        raise FileExistsError(
            f"{target} exists and has no {marker}: it was not written by genctr, so --overwrite "
            "will not delete it; choose another path"
        )


def replace_dir(new: Path, target: Path) -> None:
    """Local: the complete directory ``new`` takes the name ``target``. An existing ``target``
    is renamed aside (``NAME.old``) first and deleted last, so a complete copy exists at every
    instant (``checkpoint.recover_saved`` puts an aside copy back after a kill)."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def copy_tree(source: Location, target: Location, last: str | None = None) -> None:
    """Copy every file under ``source`` to ``target`` (local or object storage, either way);
    the file named ``last`` (a manifest, meta.json) is written after every other one, so that a
    reader requiring it never sees a partial copy."""
    files = sorted(files_under(source), key=lambda p: (p.name == last, str(p)))
    for file in files:
        name = relative_name(file, source)
        destination = target / name
        if not is_remote(source) and is_remote(target):
            target.fs.put_file(str(file), destination.path)
        elif is_remote(source) and is_remote(target):
            source.fs.copy(file.path, destination.path)
        elif is_remote(source):
            Path(destination).parent.mkdir(parents=True, exist_ok=True)
            source.fs.get_file(file.path, str(destination))
        else:
            Path(destination).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, destination)


@contextmanager
def publish(
    target: str | os.PathLike,
    overwrite: bool = False,
    marker: str | None = None,
    last: str | None = None,
) -> Iterator[Path]:
    """The one way a directory appears (a dataset, an artifact): yields a local staging
    directory that becomes ``target`` only if the block succeeds. On local disk it is renamed
    into place (:func:`replace_dir`); on object storage, which has no rename, it is uploaded
    with ``last`` (the file readers require: meta.json, a manifest) written last, and an old
    copy loses its ``last`` first, so that it is never half old, half new. ``overwrite`` and
    ``marker``: :func:`check_replaceable`. Outputs get the umask's permissions."""
    destination = location(target)
    check_replaceable(destination, overwrite, marker)
    if is_remote(destination):
        with tempfile.TemporaryDirectory(prefix="genctr-publish-") as staging:
            yield Path(staging)
            if last is not None:
                (destination / last).unlink(missing_ok=True)
            remove_tree(destination)
            copy_tree(Path(staging), destination, last=last)
        return
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    try:
        yield tmp
        shared_permissions(tmp)  # mkdtemp's 0700 would hide it from other users
        replace_dir(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_tree(path: Location) -> None:
    """Delete a directory (prefix) and everything under it; nothing if it does not exist."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        path.fs.rm(path.path, recursive=True)
    except FileNotFoundError:
        pass


def make_dirs(path: Location) -> None:
    """Create a local directory; object storage has no directories (a no-op there)."""
    if not is_remote(path):
        path.mkdir(parents=True, exist_ok=True)


def files_under(directory: Location) -> list[Location]:
    """Every file under ``directory``, recursively, sorted."""
    if not is_remote(directory):
        return sorted(p for p in directory.rglob("*") if p.is_file())
    fs = directory.fs
    found = fs.find(directory.path)
    return sorted(location(f"{directory.protocol}://{name}") for name in found)


def relative_name(path: Location, directory: Location) -> str:
    """``path``'s name below ``directory`` (``a/b.bin``), the same on disk and in a bucket."""
    if is_remote(directory):
        return path.path[len(directory.path.rstrip("/")) + 1 :]
    return path.relative_to(directory).as_posix()


def sha256(path: Location) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_relative(name: str) -> str:
    """``name`` if it is a relative POSIX path that stays below its directory; raises
    ValueError otherwise (an absolute name, ``..``, empty or ``.`` parts, a backslash): a
    name from a bucket or a manifest becomes a local path only through here."""
    parts = name.split("/")
    if (
        not name
        or "\\" in name
        or "\x00" in name
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise ValueError(f"{name!r} is not a plain relative file name")
    return name


def download_files(source: Location, names: list[str], target: Path) -> None:
    """Copy the files ``names`` (relative to ``source``) into local ``target`` (created), and
    nothing else; a name that would land outside ``target`` is refused before any copy."""
    root = target.resolve()
    destinations = []
    for name in names:
        destination = (target / safe_relative(name)).resolve()
        if not destination.is_relative_to(root):
            raise ValueError(f"{name!r} resolves outside {target}")
        destinations.append(destination)
    for name, destination in zip(names, destinations, strict=True):
        destination.parent.mkdir(parents=True, exist_ok=True)
        source.fs.get_file((source / name).path, str(destination))


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created) for the block: processes on this host
    sharing a directory take turns; the kernel releases it if the holder dies."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def shared_permissions(path: Path) -> None:
    """Give ``path`` (a file, or a directory and everything under it) the permissions a
    normally created one would have under this process's umask: ``mkdtemp`` and ``mkstemp``
    create 0700 / 0600, which another user (a serving account) could not read."""
    umask = os.umask(0)
    os.umask(umask)
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in paths:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def cache_dir() -> Path:
    """Where downloads are kept: ``GENCTR_CACHE`` or ``~/.cache/genctr-rec``."""
    return Path(os.environ.get("GENCTR_CACHE", Path.home() / ".cache" / "genctr-rec"))


def describe_error(exc: BaseException, where: str = "") -> str | None:
    """One line for an object-storage failure (credentials, bucket, endpoint), or None when
    ``exc`` is not one."""
    text = f"{type(exc).__name__}: {exc}"
    module = type(exc).__module__
    place = f"{where}: " if where else ""
    if "NoCredentialsError" in text or "Unable to locate credentials" in text:
        return (
            f"{place}no credentials for object storage: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        )
    for code, meaning in (
        ("InvalidAccessKeyId", "the access key is not known to the store"),
        ("does not exist in our records", "the access key is not known to the store"),
        ("SignatureDoesNotMatch", "the secret key does not match the access key"),
        ("signature we calculated does not match", "the secret key does not match the access key"),
        ("NoSuchBucket", "the bucket does not exist"),
        ("The specified bucket does not exist", "the bucket does not exist"),
        ("AccessDenied", "access denied by the store"),
        ("Forbidden", "access denied by the store"),
    ):
        if code in text:
            return f"{place}{meaning} ({first_line(exc)})"
    if (
        "EndpointConnectionError" in text
        or "Could not connect to the endpoint" in text
        or (module.startswith(("aiohttp", "botocore", "aiobotocore")) and "connect" in text.lower())
    ):
        return f"{place}cannot reach the object store ({first_line(exc)}); check AWS_ENDPOINT_URL"
    if module.startswith(("botocore", "aiobotocore", "s3fs")):
        return f"{place}object storage failed: {first_line(exc)}"
    return None


def first_line(exc: BaseException) -> str:
    """The first line of an error's message (at most 300 characters), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def check_reachable(where: str) -> None:
    """Raise :class:`StorageError` with one line when ``where`` (a URL) cannot be listed:
    no credentials, wrong keys, a missing bucket, an unreachable endpoint."""
    if not is_url(where):
        return
    path = location(where)
    try:
        # the prefix itself, never the bucket's root: a credential may list only below it
        path.fs.ls(path.path, detail=False)
    except FileNotFoundError as exc:  # a prefix not written yet, or no such bucket
        if "bucket" in str(exc).lower() or not _bucket_exists(path):
            reason = describe_error(exc, where) or f"{where}: the bucket does not exist"
            raise StorageError(reason) from exc
    except Exception as exc:  # noqa: BLE001 - every client error becomes one line
        raise StorageError(describe_error(exc, where) or f"{where}: {first_line(exc)}") from exc


def _bucket_exists(path: UPath) -> bool:
    """Whether the bucket of ``path`` exists (HEAD on the bucket: no listing)."""
    bucket = path.path.split("/", 1)[0]
    try:
        return bool(path.fs.exists(bucket))
    except Exception:  # noqa: BLE001 - denied: it exists, and the prefix decides
        return True

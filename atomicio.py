"""Atomic file writes and content checksums.

Every output another process may read goes through here: written to a temporary file in the same
folder, flushed to disk, then renamed over the target, so a reader sees the old file or the new one,
never half of one, and a crash leaves no partial output behind but a temporary file, which the next
run of the stage that owns the folder removes (remove_leftovers). A full disk is a StorageError that
says where to free space, not an OSError traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from errors import StorageError

# Temporary names start with a dot and end in .tmp, so the ingestion of a folder never mistakes a
# half-written file for data.
TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with storage_errors(target):
        temp_path = _new_temp_file(target)
        try:
            yield temp_path
            _fsync_file(temp_path)
            os.replace(temp_path, target)
        finally:
            temp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def storage_errors(target: Path) -> Iterator[None]:
    """Turn "no space left on device" while writing `target` into a StorageError saying where to
    free space; any other OSError passes unchanged."""
    try:
        yield
    except OSError as error:
        if error.errno not in NO_SPACE:
            raise
        raise StorageError(
            f"the disk holding {Path(target).parent} is full (writing {Path(target).name}): free "
            "space there — old logs, source files already ingested, releases beyond "
            "deployment.keep_releases — and run again; nothing was half-written"
        ) from error


def _new_temp_file(target: Path) -> Path:
    """Create an empty, uniquely named file beside `target` (what tempfile.mkstemp does, without
    the cost of importing tempfile on the cron fast path)."""
    while True:
        candidate = target.with_name(f"{TEMP_PREFIX}{target.name}.{os.urandom(6).hex()}{TEMP_SUFFIX}")
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            continue
        return candidate


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as stream:
        os.fsync(stream.fileno())


def write_with(target: Path, writer: Callable[[Path], Any]) -> None:
    """Let `writer(path)` write a temporary file, then move it over `target` atomically."""
    with atomic_path(target) as temp_path:
        writer(temp_path)


def write_text(target: Path, text: str) -> None:
    """Atomically replace `target` with `text` (UTF-8)."""
    with atomic_path(target) as temp_path:
        temp_path.write_text(text, encoding="utf-8")


def write_bytes(target: Path, data: bytes) -> None:
    """Atomically replace `target` with `data`."""
    with atomic_path(target) as temp_path:
        temp_path.write_bytes(data)


def write_json(target: Path, payload: Any) -> None:
    """Atomically write `payload` as indented JSON a person can read."""
    write_text(target, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def copy_file(source: Path, target: Path) -> None:
    """Atomically copy `source` to `target`."""
    import shutil

    with atomic_path(target) as temp_path:
        shutil.copyfile(source, temp_path)


@contextlib.contextmanager
def open_atomic(target: Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file for writing; it replaces `target` only if the block succeeds."""
    with atomic_path(target) as temp_path, open(temp_path, mode, **kwargs) as stream:
        yield stream


def sha256_of(path: Path) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    import hashlib  # here, not at the top: loading OpenSSL would slow the cron no-op check

    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_leftovers(
    folder: Path, older_than: float, names: Iterable[str] | None = None
) -> list[Path]:
    """Delete the temporary files that killed writers left in `folder`; return what was deleted.

    Only files last written before `older_than` (seconds since the epoch) go: the caller holds the
    pipeline lock since then, so no live writer can own them. `names` limits the sweep to the
    temporary files of those targets, for folders that writers without the lock share.
    """
    targets = None if names is None else set(names)
    removed = []
    for path in Path(folder).glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
        target = path.name[len(TEMP_PREFIX):-len(TEMP_SUFFIX)].rpartition(".")[0]
        if targets is not None and target not in targets:
            continue
        with contextlib.suppress(FileNotFoundError):
            if path.is_file() and path.stat().st_mtime < older_than:
                path.unlink()
                removed.append(path)
    return removed


def read_json(path: Path) -> Any:
    """Read a JSON file written by write_json."""
    with open(path, encoding="utf-8") as stream:
        return json.load(stream)

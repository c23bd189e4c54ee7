"""The pipeline lock: one run at a time changes the ingested data, models, releases and reports.

The cron cycle holds it for the whole cycle, and every stage that writes shared state (ingestion,
training, scoring, deployment and rollback, reporting) takes it as well, so that a stage run by hand
while a cycle runs waits for it (`lock.wait_seconds`) or says who holds it and exits with
errors.EXIT_BUSY, instead of interleaving its writes with the cycle's.

The lock is an flock on a file in the output folder, which the kernel releases when its holder
dies: a killed run never blocks the next one. Within one thread it is re-entrant, because the cycle
calls the stages in-process while it holds the lock: their own calls join the cycle's hold.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from errors import CycleBusyError
from settings import Settings

log = logging.getLogger(__name__)

# The name the cycle's own lock had before every stage shared it: a cycle of an older version and a
# stage of this one still exclude each other.
LOCK_NAME = ".fullprocess.lock"
POLL_SECONDS = 0.1


class _Hold:
    """This thread's hold of one lock file: the open file that carries the flock, and its holder."""

    __slots__ = ("stream", "holder", "since", "started", "depth")

    def __init__(self, stream: IO[str], holder: str, since: str, started: float) -> None:
        self.stream = stream
        self.holder = holder
        self.since = since
        self.started = started
        self.depth = 1


# (lock file, thread) -> hold. An flock belongs to an open file, not a thread: a second thread opens
# the file again and waits like any other process.
_holds: dict[tuple[str, int], _Hold] = {}


def lock_path(settings: Settings) -> Path:
    return settings.output_folder / LOCK_NAME


@contextlib.contextmanager
def pipeline_lock(
    settings: Settings, holder: str, *, wait_seconds: float | None = None, nested: bool = True
) -> Iterator[None]:
    """Hold the pipeline lock as `holder` ("a cycle", "ingestion", ...) for the `with` block.

    Waits at most `wait_seconds` (default `lock.wait_seconds`) for another holder, then raises
    CycleBusyError: "a cycle is running (pid N, since T); try again". In a thread that holds the
    lock already the call joins that hold, unless `nested` is False (a cycle, which never runs
    inside another run), when it is refused the same way.
    """
    path = lock_path(settings)
    key = (str(path), threading.get_ident())
    hold = _holds.get(key)
    if hold is not None:
        if not nested:
            raise CycleBusyError(_busy(hold.holder, os.getpid(), hold.since))
        hold.depth += 1
        try:
            yield
        finally:
            hold.depth -= 1
        return

    wait = settings.lock.wait_seconds if wait_seconds is None else wait_seconds
    hold = _acquire(path, holder, wait)
    _holds[key] = hold
    try:
        yield
    finally:
        del _holds[key]
        fcntl.flock(hold.stream, fcntl.LOCK_UN)
        hold.stream.close()


def held_since(settings: Settings) -> float | None:
    """When this thread took the pipeline lock (seconds since the epoch), or None if it holds none.

    A temporary file or staging folder last written before then belongs to a run that is dead.
    """
    hold = _holds.get((str(lock_path(settings)), threading.get_ident()))
    return None if hold is None else hold.started


def _acquire(path: Path, holder: str, wait_seconds: float) -> _Hold:
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = open(path, "a+", encoding="utf-8")  # noqa: SIM115 -- held open for the whole hold
    deadline = time.monotonic() + wait_seconds
    waiting = False
    while True:
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            busy = _holder_of(stream, path)
            if time.monotonic() >= deadline:
                stream.close()
                raise CycleBusyError(busy) from None
            if not waiting:
                log.info("%s; waiting up to %.0f s", busy.removesuffix("; try again"), wait_seconds)
                waiting = True
            time.sleep(POLL_SECONDS)
    started = time.time()
    since = datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds")
    stream.seek(0)
    stream.truncate()
    stream.write(json.dumps({"holder": holder, "pid": os.getpid(), "since": since}) + "\n")
    stream.flush()
    return _Hold(stream, holder, since, started)


def _holder_of(stream: IO[str], path: Path) -> str:
    """What the lock file says about its holder, as the message a person reads."""
    stream.seek(0)
    text = stream.read().strip()
    try:
        about = json.loads(text)
        return _busy(about["holder"], about["pid"], about["since"])
    except (ValueError, KeyError, TypeError):
        # Being written this instant, or the one-line format of earlier versions.
        return f"another run holds the pipeline lock {path} ({text or 'holder unknown'}); try again"


def _busy(holder: str, pid: int, since: str) -> str:
    return f"{holder} is running (pid {pid}, since {since}); try again"

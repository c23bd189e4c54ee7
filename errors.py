"""The errors a user can act on, and the one wrapper that turns them into a line and an exit code.

Every stage raises one of these for a problem the user can fix (a bad config, a bad data file, no
model yet); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
# Another run holds the pipeline lock: nothing was done, and the same command can be run again
# later. 75 is EX_TEMPFAIL of sysexits.h, "a temporary failure; try again".
EXIT_BUSY = 75
# ingestion.py: every new file it tried was rejected, so nothing new went in (the others are fine).
EXIT_ALL_REJECTED = 3


class PipelineError(Exception):
    """A problem the user can fix; the message says what, where, and what to do."""


class ConfigError(PipelineError):
    """config.json is missing, malformed, or names something that does not exist."""


class DataError(PipelineError):
    """A data file cannot be used: unreadable, empty, or missing required columns."""


class InsufficientDataError(DataError):
    """There is too little usable data to train or score a model."""


class ModelNotFoundError(PipelineError):
    """No trained model where one was expected."""


class ModelNotDeployedError(PipelineError):
    """Nothing has been deployed to production yet."""


class DeploymentError(PipelineError):
    """A release is incomplete, corrupt, or cannot be found."""


class CycleBusyError(PipelineError):
    """Another cycle or stage holds the pipeline lock; nothing was done (exit code EXIT_BUSY)."""


class StorageError(PipelineError):
    """The disk is full or the records database is locked: the message names what to free."""


class DataNotReady(PipelineError):
    """An answer needs something not produced yet; the message names the command that makes it.

    No master dataset, no diagnostics recorded, no risk list, no report.
    """


class DataFileNotFound(DataError):
    """A data file a request names does not exist."""


class UnsupportedInput(DataError):
    """A request's input comes in a form that cannot be read (its content type)."""


class InputTooLarge(DataError):
    """A request's input is larger than the configured limit."""


def configure_logging(verbose: bool = False) -> None:
    """Log to stderr, so that stdout carries only a command's own output."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run a command's main(): known errors become one line on stderr and exit code 2, or
    EXIT_BUSY when another run holds the pipeline lock."""
    configure_logging()
    try:
        return main(argv)
    except CycleBusyError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BUSY
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

"""What every entry point shares: one-line messages for user errors, and the configs' resolvers.

Each ``python -m herd.X`` reports a mistake the user can fix (a bad option, a missing file) as one
line, ``herd.X: <message>``, on stderr and exits with status 2, without a traceback::

    @hydra.main(...)
    def main(cfg):
        with user_errors("herd.generate"):
            texts = run(cfg)

:func:`register_resolvers` registers the OmegaConf resolvers that herd's configs use
(``${herd_root:}``, ``${herd_run_id:}``); an entry point that composes those configs calls it at
import time.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from herd.paths import repo_root

USER_ERROR_STATUS = 2
# What herd raises for a mistake the user can fix: a missing file, a bad value, a missing option.
USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError, MissingMandatoryValue)


def user_error(command: str, err: BaseException) -> str:
    """The one-line message for a mistake the user can fix (a missing option names itself and the fix)."""
    if isinstance(err, MissingMandatoryValue):
        return f"{err.full_key} is required: python -m {command} {err.full_key}=..."
    if isinstance(err, KeyError):
        return str(err.args[0]) if err.args else "missing key"
    return str(err)


@contextmanager
def user_errors(
    command: str,
    errors: tuple[type[BaseException], ...] = USER_ERRORS,
    *,
    prefix: str | None = None,
    status: int = USER_ERROR_STATUS,
    on_error: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Turn ``errors`` raised inside into ``<prefix>: <message>`` on stderr and exit ``status`` (2).

    ``prefix`` defaults to ``command`` (``herd.generate``); ``on_error`` gets the printed line first
    (e.g. to keep it in the run's folder too).
    """
    try:
        yield
    except errors as err:
        message = f"{prefix or command}: {user_error(command, err)}"
        if on_error is not None:
            on_error(message)
        print(message, file=sys.stderr)
        sys.exit(status)


def run_id() -> str:
    """Names a run folder; the same on every rank and node of one launch.

    A SLURM job id or a torchrun rendezvous id (``--rdzv-id``) when there is one, ``HERD_RUN_ID``
    if set, else the start time (single-node launches: Lightning passes the folder to its ranks).
    """
    if os.environ.get("HERD_RUN_ID"):
        return os.environ["HERD_RUN_ID"]
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    if os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def register_resolvers() -> None:
    """Register ``${herd_root:}`` (the repository root) and ``${herd_run_id:}`` (:func:`run_id`); idempotent."""
    OmegaConf.register_new_resolver("herd_root", lambda: str(repo_root()), replace=True)
    OmegaConf.register_new_resolver("herd_run_id", run_id, replace=True)

"""herd commands run as child processes, each in a folder of its own with a record of it.

What ``herd.pipeline`` (one folder per step: ``step.json``, ``step.log``) and ``herd.scaling``
(one folder per ladder rung: ``scaling_run.json``, ``herd.train.out``) share:

- a JSON record per folder (:func:`read_record`, :func:`write_record`, atomic): the command, and
  whether it finished; a caller skips a command whose record says it is done;
- :func:`run_logged`: the command's output into a log file in its folder (and to the console),
  its wall and CPU seconds, and the child stopped with its parent (Ctrl-C, or SIGTERM in the
  main thread: it gets SIGTERM, then SIGKILL after 30 s).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

KILL_AFTER_SECONDS = 30


def read_record(path: Path) -> dict[str, Any]:
    """The JSON record at ``path`` ({} when there is none, or it is not JSON)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_record(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (a reader sees the old record or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    temporary.replace(path)


@dataclass(frozen=True)
class Finished:
    """How a command ended: its exit status, wall seconds and CPU seconds (user + system, of its processes)."""

    status: int
    seconds: float
    cpu_seconds: float


def run_logged(command: Sequence[str], log_file: Path, *, echo: bool = True, cwd: Path | None = None,
               env: Mapping[str, str] | None = None) -> Finished:
    """Run ``command`` (from ``cwd``; None: this process's folder), appending its output to ``log_file``
    after a ``# <time>: <command>`` line, and to the console when ``echo``.

    ``env`` adds to this process's environment (``PYTHONUNBUFFERED=1`` is always set, so lines
    arrive as they are written). The CPU seconds are those of this process's children that
    finished meanwhile (with several commands at once in threads, theirs too).
    """
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    started, cpu_before = time.monotonic(), _children_cpu_seconds()
    with open(log_file, "a", encoding="utf-8") as log:
        log.write(f"# {datetime.now().isoformat(timespec='seconds')}: {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(list(command), cwd=cwd, env=environment, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1)
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main_thread else None
        try:
            assert process.stdout is not None
            for line in process.stdout:
                if echo:
                    sys.stdout.write(line)
                log.write(line)
            status = process.wait()
        except BaseException:
            process.terminate()
            try:
                process.wait(timeout=KILL_AFTER_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
            if echo:
                sys.stdout.flush()
    return Finished(status, time.monotonic() - started, _children_cpu_seconds() - cpu_before)


def _children_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process's finished child processes, their own children included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")

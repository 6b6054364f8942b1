"""herd commands run as child processes, each in a folder of its own with a record of it.

What ``herd.pipeline`` (one folder per step: ``step.json``, ``step.log``) and ``herd.scaling``
(one folder per ladder rung: ``scaling_run.json``, ``herd.train.out``) share:

- a JSON record per folder (:func:`read_record`, :func:`write_record`, atomic): the command, and
  whether it finished; a caller skips a command whose record says it is done;
- :func:`run_logged`: the command's output into a log file in its folder (and to the console),
  line by line (a line the child printed is on disk even if the parent is then killed with
  SIGKILL), its wall and CPU seconds, and the child stopped with its parent: SIGINT or SIGTERM
  to the parent's main thread is forwarded to the child (SIGKILL after 30 s), and the parent then
  raises :class:`Interrupted`;
- a pid file per running command (:func:`running_pid`): a command whose parent was killed with
  SIGKILL goes on alone, and the next run of the parent finds it still running instead of
  starting a second one beside it.
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
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The parent was asked to stop (``signum``: SIGINT or SIGTERM) while a command ran; the command got the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


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
               env: Mapping[str, str] | None = None, pid_file: Path | None = None) -> Finished:
    """Run ``command`` (from ``cwd``; None: this process's folder), appending its output to ``log_file``
    after a ``# <time>: <command>`` line, and to the console when ``echo``.

    ``env`` adds to this process's environment (``PYTHONUNBUFFERED=1`` is always set, so lines
    arrive as they are written); each line is written to ``log_file`` as it arrives. The CPU
    seconds are those of this process's children that finished meanwhile (with several commands
    at once in threads, theirs too). ``pid_file`` holds the child's pid while it runs (see
    :func:`running_pid`). In the main thread, SIGINT and SIGTERM are forwarded to the child, and
    :class:`Interrupted` is raised once it has stopped.
    """
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    started, cpu_before = time.monotonic(), _children_cpu_seconds()
    with open(log_file, "a", encoding="utf-8", buffering=1) as log:  # line-buffered: each line is on disk at once
        log.write(f"# {datetime.now().isoformat(timespec='seconds')}: {' '.join(command)}\n")
        process = subprocess.Popen(list(command), cwd=cwd, env=environment, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1)
        if pid_file is not None:
            write_record(pid_file, {"pid": process.pid, "start_time": _start_time(process.pid),
                                    "command": list(command)})
        main_thread = threading.current_thread() is threading.main_thread()
        previous = {signum: signal.signal(signum, _raise_interrupt) for signum in FORWARDED_SIGNALS} if main_thread else {}
        try:
            assert process.stdout is not None
            for line in process.stdout:
                if echo:
                    sys.stdout.write(line)
                log.write(line)
            status = process.wait()
        except BaseException as err:
            _stop(process, err.signum if isinstance(err, Interrupted) else signal.SIGTERM)
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if pid_file is not None and process.poll() is not None:
                pid_file.unlink(missing_ok=True)
            if echo:
                sys.stdout.flush()
    return Finished(status, time.monotonic() - started, _children_cpu_seconds() - cpu_before)


def running_pid(pid_file: Path) -> int | None:
    """The pid in ``pid_file`` (written by :func:`run_logged`) if that process is still running, else None.

    A command whose parent was killed with SIGKILL leaves its pid file behind and may still run.
    The pid counts as running only if it exists, is not a zombie and (where /proc tells) started
    when the recorded one did, so a pid reused by another process is not taken for it.
    """
    record = read_record(pid_file)
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's process: not ours
        return None
    stat = _proc_stat(pid)
    if stat is None:
        return pid  # no /proc (not Linux): the signal test is all there is
    state, start_time = stat
    if state == "Z" or (record.get("start_time") is not None and start_time != record["start_time"]):
        return None
    return pid


def _stop(process: subprocess.Popen, signum: int) -> None:
    """Send ``signum`` to the child and wait for it; SIGKILL after KILL_AFTER_SECONDS."""
    try:
        process.send_signal(signum)
        process.wait(timeout=KILL_AFTER_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    except KeyboardInterrupt:  # asked again while waiting: do not wait any longer
        process.kill()
        raise


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process, from /proc; None without /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state is field 3, starttime field 22
    return fields[0], int(fields[19])


def _start_time(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _children_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process's finished child processes, their own children included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _raise_interrupt(signum, frame) -> None:
    raise Interrupted(signum)

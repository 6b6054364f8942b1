"""Runs a list of herd commands as one pipeline: Llama 3's post-training rounds from one command.

    python -m herd.pipeline pipeline=tiny_posttrain start=logs/pretrain/runs/<run>/export
    python -m herd.pipeline pipeline=tiny_posttrain start=... rounds=3 num_samples=16
    python -m herd.pipeline pipeline=tiny_posttrain start=... dry_run=true   # print the commands only
    python -m herd.pipeline pipeline=tiny_posttrain start=... until=round1/sample

A pipeline (``configs/pipeline/<name>.yaml``) is a list of steps. Each step runs one herd tool in a
process of its own, so each has its own Hydra config, with the overrides the step lists:

- ``train``: ``python -m herd.train`` (its output is the run's ``export/`` model directory);
- ``prepare``: ``python -m herd.prepare`` (its output is the prepared folder);
- ``rejection_sample``: ``python -m herd.rejection_sample`` (its output is the folder of
  ``sft.jsonl``, ``preferences.jsonl`` and ``stats.json``);
- ``average``: ``python -m herd.average`` (its output is the averaged model directory);
- ``command``: any command line (``argv``; ``python`` is this interpreter), whose output is the
  path named by ``output`` (default: the step's folder).

Steps come in three lists: ``setup`` (once), ``round`` (once per round, ``rounds`` times; a step
with ``rounds: [1]`` runs only in the rounds listed) and ``finish`` (once; a step with
``per_round: true`` runs once per round 0..R, e.g. to evaluate every round's policy alike).
A training step with ``seeds: [s1, s2, ...]`` trains once per seed (``seed=s``) and its output is
the average of those runs' models (``herd.average``, equal weights), as Llama 3 averages models
at each stage.

A step's overrides (``args``: a list of ``key=value`` strings, or a mapping) may use the
pipeline's keys (``${start}``, ``${num_samples}``; a list entry that is itself a list, such as
an interpolated list of shared overrides, is spliced in) and these resolvers:

- ``${step:NAME}``: the output of step NAME: this round's step of that name, else the setup
  step; or a qualified name (``setup/sft``, ``round2/reward``; ``last/reward`` is the last round's);
- ``${previous:NAME,FIRST}``: in a round step, the output of step NAME of the previous round; in
  round 1, FIRST (e.g. ``${previous:reward,${policy:}}``: a reward model that continues the previous
  round's, starting from the policy in round 1);
- ``${policy:}``: the policy entering this round (round 1: the pipeline's ``first_policy``, then
  the output of the previous round's ``policy_step``); in a ``per_round`` finish step, the policy
  that round r ended with (round 0: ``first_policy``);
- ``${round:}``: the round number (0 in setup and finish, r in a per-round finish step);
- ``${dir:}``: the step's own folder.

Where things go: everything lands in ``logs/pipeline/<run>/`` (``run`` defaults to the pipeline's
name), one folder per step (``setup/sft``, ``round1/reward``, ``finish/round2/heldout``), so one
``tensorboard --logdir logs/pipeline/<run>`` shows every step. Each step folder holds the tool's
own files, ``step.log`` (the step's console output) and ``step.json``: its command, status,
wall and CPU seconds (of the step's processes), output and key metrics. ``summary.json`` lists every
step with its output and metrics, the per-round table of the pipeline's ``report`` columns and the
final model (``final_model``: the output of the step the config's ``final_model`` names, else the
last round's ``policy_step``), and is rewritten after each step. When the pipeline stops (finished,
``until``, a failed step) it also writes ``report.md``: the final model, the per-round table with a
figure of each column (``report_rounds.png``), the training steps' loss curves
(``report_training.png``), held-out answers of the round-0 and the last policy side by side, and
every step with links to its output, TensorBoard folder and log.

Failures and resuming: a step that exits with an error stops the pipeline, naming the step and its
log (exit status 1). Running the same command again skips every step that finished with the same
command line and whose output is complete, so an interrupted pipeline resumes where it stopped:

- a step that was killed midway runs again in its own folder; a training step continues from its
  last checkpoint there (``herd.train`` with ``resume=auto``; killed after its checkpoint at
  ``max_steps``, before its export, it is only finished: validated and exported);
- once a step runs, every later step runs too (their inputs may have changed), and a step whose
  command line changed (another option, another input) starts over in an emptied folder;
- SIGINT or SIGTERM to the pipeline is forwarded to the running step, which is recorded as
  ``interrupted`` in its ``step.json`` (exit status 128 + the signal's number); ``step.log`` is
  written line by line, so a step killed with SIGKILL keeps every line it printed;
- a step whose pipeline was killed with SIGKILL (and not its process group) keeps running alone:
  its pid is in ``step.pid``, and running the pipeline again refuses to start that step a second
  time while the first is alive (exit status 2, naming the pid).

Mistakes in the pipeline config (an unknown tool, a reference to a later or unknown step, a
missing ``start``) are reported before anything runs, with exit status 2.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
import shutil
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from herd import cli, reports
from herd.commands import Interrupted, read_record, run_logged, running_pid, write_record
from herd.interop import gguf
from herd.paths import repo_root, resolve
from herd.scalars import flat_scalars, read_scalars

logger = logging.getLogger(__name__)

STEP_FILE = "step.json"
STEP_LOG = "step.log"
STEP_PID = "step.pid"  # the step's process while it runs
SUMMARY_FILE = "summary.json"
SECTIONS = ("setup", "round", "finish")


class PipelineError(ValueError):
    """A pipeline config that cannot run; the message names the step and the key."""


class StepStillRunning(PipelineError):
    """A step's process from an earlier run of the pipeline (killed with SIGKILL) is still alive."""

    def __init__(self, step: Step, pid: int) -> None:
        self.step, self.pid = step, pid
        super().__init__(f"step {step.name} is still running as process {pid}, started by an earlier herd.pipeline "
                         f"that was killed (its output goes on into {step.dir / STEP_LOG}): wait for it to end, or "
                         f"stop it (kill {pid}), then run the same command again")


class StepFailed(RuntimeError):
    """A step's command exited with an error."""

    def __init__(self, step: Step, status: int) -> None:
        self.step, self.status = step, status
        super().__init__(f"step {step.name} failed (exit status {status}); its output is in {step.dir / STEP_LOG}")


# --- tools --------------------------------------------------------------------------------------


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file())


@dataclass(frozen=True)
class Tool:
    """How the pipeline runs one kind of step: its module, where its output is, when it is complete,
    and the overrides (set by the pipeline, not the step) that put its files into the step's folder."""

    module: str | None
    output: Callable[[Path], Path]
    complete: Callable[[Path], bool]
    placement: Callable[[Path], list[str]]


TOOLS: dict[str, Tool] = {
    "train": Tool("herd.train", lambda d: d / "export", _is_model_dir,
                  # paths.log_dir: resume=auto looks for other runs of the task there; the step's folder has none
                  lambda d: [f"hydra.run.dir={d}", f"paths.log_dir={d}", "resume=auto"]),
    "prepare": Tool("herd.prepare", lambda d: d / "data", lambda o: (o / "manifest.json").is_file(),
                    lambda d: [f"hydra.run.dir={d}", f"output_dir={d / 'data'}", "progress=false"]),
    "rejection_sample": Tool("herd.rejection_sample", lambda d: d, lambda o: (o / "stats.json").is_file(),
                             lambda d: [f"output_dir={d}"]),
    "average": Tool("herd.average", lambda d: d / "model", _is_model_dir,
                    lambda d: [f"output={d / 'model'}", "overwrite=true"]),
    "command": Tool(None, lambda d: d, lambda o: o.exists(), lambda d: []),
}


# --- the plan -----------------------------------------------------------------------------------


@dataclass
class Step:
    """One command of the expanded pipeline, in run order."""

    name: str  # qualified: setup/sft, round1/reward, round1/reward/seed2, finish/round0/heldout
    section: str
    short: str  # the name in the pipeline config
    round: int
    tool: str
    dir: Path
    output: Path
    spec: Any = None  # the step's config node (args resolved lazily, in this step's context)
    seed: int | None = None
    average_of: list[Step] = field(default_factory=list)
    command: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class View:
    """Where a reference is resolved from: a step of the plan, seen as part of ``section`` (setup for
    ``first_policy``, which is resolved before any round)."""

    plan: Plan
    step: Step
    section: str


_CONTEXT: contextvars.ContextVar[View | None] = contextvars.ContextVar("herd_pipeline_step", default=None)


class Plan:
    """The expanded steps of a pipeline config, with every step's folder and output known up front."""

    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.rounds = _non_negative_int(cfg.get("rounds", 0), "rounds")
        self.steps: list[Step] = []
        self.by_name: dict[str, Step] = {}
        for section in SECTIONS:
            specs = cfg.get(section)
            specs = OmegaConf.create([]) if specs is None else specs
            if not isinstance(specs, ListConfig):
                raise PipelineError(f"{section} must be a list of steps, got {type(specs).__name__}")
            _check_names(section, specs)
            if section == "round":
                for number in range(1, self.rounds + 1):
                    for spec in specs:
                        if spec.get("rounds") is None or number in list(spec.rounds):
                            self._add(section, spec, number, f"round{number}")
            elif section == "finish":
                for spec in specs:
                    if spec.get("per_round"):
                        for number in range(self.rounds + 1):
                            self._add(section, spec, number, f"finish/round{number}")
                    else:
                        self._add(section, spec, 0, "finish")
            else:
                for spec in specs:
                    self._add(section, spec, 0, "setup")

    def _add(self, section: str, spec: DictConfig, number: int, prefix: str) -> None:
        short = spec.get("name")
        tool = spec.get("tool")
        if tool not in TOOLS:
            raise PipelineError(f"step {prefix}/{short}: tool={tool!r} is not one of {sorted(TOOLS)}")
        name = f"{prefix}/{short}"
        folder = self.run_dir / name
        seeds = spec.get("seeds")
        if seeds is not None and tool != "train":
            raise PipelineError(f"step {name}: seeds only apply to tool=train steps")
        seeds = list(seeds) if seeds is not None else []
        if len(seeds) <= 1:
            step = self._append(Step(name, section, short, number, tool, folder, TOOLS[tool].output(folder), spec,
                                     int(seeds[0]) if seeds else None))
            if tool == "command" and spec.get("output") is not None:
                output = Path(str(self._resolved(step, "output", "")))
                step.output = output if output.is_absolute() else folder / output
            return
        runs = []
        for seed in seeds:
            run_dir = folder / f"seed{seed}"
            runs.append(self._append(Step(f"{name}/seed{seed}", section, short, number, tool, run_dir,
                                          TOOLS[tool].output(run_dir), spec, int(seed))))
        self._append(Step(name, section, short, number, "average", folder, TOOLS["average"].output(folder), spec,
                          average_of=runs))

    def _append(self, step: Step) -> Step:
        self.steps.append(step)
        self.by_name[step.name] = step
        return step

    # --- resolution ----------------------------------------------------------------------------

    def resolve_all(self) -> None:
        """Build every step's command line (this resolves every reference, so mistakes show now)."""
        for step in self.steps:
            step.command = self.command(step)

    def command(self, step: Step) -> list[str]:
        """The step's command line, with the pipeline's own overrides last."""
        tool = TOOLS[step.tool]
        if step.average_of:
            models = ",".join(_quote(str(run.output)) for run in step.average_of)
            return [sys.executable, "-m", "herd.average", f"models=[{models}]", *tool.placement(step.dir)]
        if step.tool == "command":
            argv = [str(a) for a in self._resolved(step, "argv", [])]
            if not argv:
                raise PipelineError(f"step {step.name}: tool=command needs argv (the command line as a list)")
            return [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]
        args = _overrides(self._resolved(step, "args", []), step.name)
        placement = tool.placement(step.dir) + ([f"seed={step.seed}"] if step.seed is not None else [])
        taken = {_key(p) for p in placement}
        clash = sorted(taken & {_key(a) for a in args})
        if clash:
            raise PipelineError(f"step {step.name} sets {clash}, which the pipeline sets itself (the step's folder, "
                                "its resume, its seed): leave them out of args")
        return [sys.executable, "-m", str(tool.module), *args, *placement]

    def _resolved(self, step: Step, key: str, default: Any) -> Any:
        """``step.spec[key]`` with every interpolation resolved as seen from ``step``."""
        if step.spec.get(key) is None:
            return default
        token = _CONTEXT.set(View(self, step, step.section))
        try:
            node = step.spec[key]
            return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        except OmegaConfBaseException as err:
            raise PipelineError(f"step {step.name}: {key}: {_cause(err)}") from None
        finally:
            _CONTEXT.reset(token)

    def output_of(self, reference: str, view: View) -> Path:
        """The output of the step ``reference`` names, seen from ``view`` (see the module docstring)."""
        reference = reference.strip()
        if reference.startswith("last/"):
            reference = f"round{self.rounds}/{reference.removeprefix('last/')}"
        candidates = [reference] if "/" in reference else (
            [f"round{view.step.round}/{reference}"] if view.section == "round" else []) + [f"setup/{reference}"]
        found = next((self.by_name[c] for c in candidates if c in self.by_name), None)
        if found is None:
            raise PipelineError(f"${{step:{reference}}} names no step (looked for {candidates})")
        if self.steps.index(found) >= self.steps.index(view.step):
            raise PipelineError(f"${{step:{reference}}} is {found.name}, which does not run before {view.step.name}")
        return found.output

    def final_model(self) -> Path | None:
        """The pipeline's result: the output of the step ``final_model`` names (``phrases``, ``setup/lm``,
        ``last/dpo``), else the policy the last round ended with (its ``policy_step``); None without either."""
        name = self.cfg.get("final_model")
        if name is None:
            step = self.by_name.get(f"round{self.rounds}/{self.cfg.get('policy_step')}") if self.rounds else None
            return step.output if step is not None else None
        reference = str(name).strip()
        if reference.startswith("last/"):
            reference = f"round{self.rounds}/{reference.removeprefix('last/')}"
        candidates = [reference] if "/" in reference else [f"round{self.rounds}/{reference}", f"setup/{reference}"]
        found = next((self.by_name[c] for c in candidates if c in self.by_name), None)
        if found is None:
            raise PipelineError(f"final_model={name}: no such step (looked for {candidates}); the steps are "
                                f"{list(self.by_name)}")
        return found.output

    def policy(self, view: View) -> str:
        """The policy entering the round of ``view`` (in finish steps: the policy round r ended with)."""
        step = view.step
        ended = step.round if step.section == "finish" else step.round - 1
        if ended > 0:
            return str(self.output_of(f"round{ended}/{self.cfg.policy_step}", view))
        token = _CONTEXT.set(View(self, step, "setup"))  # first_policy names setup steps
        try:
            value = OmegaConf.select(self.cfg, "first_policy", throw_on_missing=True)
        except OmegaConfBaseException as err:
            raise PipelineError(f"first_policy: {_cause(err)}") from None
        finally:
            _CONTEXT.reset(token)
        if value is None:
            raise PipelineError("${policy:} needs first_policy: the policy entering round 1 (e.g. ${start})")
        return str(value)


def _cause(err: BaseException) -> BaseException:
    """The PipelineError behind an OmegaConf error raised while resolving, else the error itself."""
    current: BaseException | None = err
    while current is not None:
        if isinstance(current, PipelineError):
            return current
        current = current.__cause__ or current.__context__
    return err


def _check_names(section: str, specs: ListConfig) -> None:
    seen = set()
    for index, spec in enumerate(specs):
        name = spec.get("name") if isinstance(spec, DictConfig) else None
        if not isinstance(name, str) or not name or "/" in name:
            raise PipelineError(f"{section}[{index}]: every step needs a name (a string without '/')")
        if name in seen:
            raise PipelineError(f"{section}: two steps are named {name!r}")
        seen.add(name)


def _non_negative_int(value: Any, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PipelineError(f"{key}={value!r}: give a whole number >= 0")
    return value


def _overrides(args: Any, name: str) -> list[str]:
    if isinstance(args, Mapping):
        out = []
        for key, value in args.items():
            if isinstance(value, Mapping | list):
                raise PipelineError(f"step {name}: args.{key} is a {type(value).__name__}; write it as a list entry "
                                    "in Hydra's override syntax, e.g. '{key}={{a: 1}}'")
            out.append(f"{key}={'null' if value is None else value}")
        return out
    if isinstance(args, list):
        flat = [item for entry in args for item in (entry if isinstance(entry, list) else [entry])]
        if all(isinstance(a, str | int | float) for a in flat):
            return [str(a) for a in flat]
    raise PipelineError(f"step {name}: args must be a list of key=value overrides (a list entry that is a list "
                        "is spliced in) or a mapping")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _quote(value: str) -> str:
    if "'" in value:
        raise PipelineError(f"the path {value} contains a quote, which herd cannot pass on a command line")
    return f"'{value}'"


def _view(resolver: str) -> View:
    view = _CONTEXT.get()
    if view is None:
        raise PipelineError(f"${{{resolver}:...}} can only be used in a pipeline step")
    return view


def _resolve_step(name: str) -> str:
    view = _view("step")
    return str(view.plan.output_of(str(name), view))


def _resolve_previous(name: str, first: Any) -> str:
    view = _view("previous")
    if view.section != "round":
        raise PipelineError("${previous:...} can only be used in a round step")
    if view.step.round == 1:
        return str(first)
    return str(view.plan.output_of(f"round{view.step.round - 1}/{name}", view))


cli.register_resolvers()  # ${herd_root:} in configs/pipeline.yaml
OmegaConf.register_new_resolver("step", _resolve_step, replace=True)
OmegaConf.register_new_resolver("previous", _resolve_previous, replace=True)
OmegaConf.register_new_resolver("policy", lambda: _view("policy").plan.policy(_view("policy")), replace=True)
OmegaConf.register_new_resolver("round", lambda: _view("round").step.round, replace=True)
OmegaConf.register_new_resolver("dir", lambda: str(_view("dir").step.dir), replace=True)


# --- running ------------------------------------------------------------------------------------


def read_step(step: Step) -> dict[str, Any]:
    """The step's ``step.json`` ({} when there is none)."""
    return read_record(step.dir / STEP_FILE)


def _command_key(command: Sequence[str]) -> list[str]:
    """The command without the interpreter's path (a new virtual environment is not a new command)."""
    return list(command[1:]) if command and command[0] == sys.executable else list(command)


class Runner:
    """Runs a resolved plan step by step, skipping the steps that are done, and keeps summary.json."""

    def __init__(self, plan: Plan, until: str | None = None) -> None:
        self.plan, self.until = plan, until
        self.records: dict[str, dict[str, Any]] = {}
        self.started = datetime.now().isoformat(timespec="seconds")

    def run(self) -> dict[str, Any]:
        """Run every step in order (or until ``until``); returns the summary."""
        rerun_all = False  # once a step runs, the later ones run too
        status = "finished"
        try:
            for step in self.plan.steps:
                done = read_step(step)
                same = done.get("command") == _command_key(step.command)
                if not rerun_all and same and done.get("status") == "finished" and TOOLS[step.tool].complete(step.output):
                    logger.info("herd.pipeline: %s is done (%s); skipping it", step.name, step.output)
                    self.records[step.name] = done | {"skipped": True}
                else:
                    resume = not rerun_all and same and step.dir.is_dir()
                    self.records[step.name] = self._run_step(step, resume)
                    rerun_all = True
                self.write_summary("running")
                if step.name == self.until:
                    status = "stopped"
                    logger.info("herd.pipeline: stopping after %s (until=%s)", step.name, self.until)
                    break
        except (StepFailed, StepStillRunning) as err:
            self.records[err.step.name] = read_step(err.step)
            self.write_report(self.write_summary("failed", failed=err.step.name))
            raise
        except BaseException:
            self.write_summary("interrupted")
            raise
        return self.write_report(self.write_summary(status))

    def write_report(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write ``report.md`` and its figures from the summary; a report that cannot be written is a
        warning, never a failed pipeline."""
        try:
            path = write_report(self.plan, summary)
        except Exception as err:  # the pipeline's own results stand without the report
            logger.warning("herd.pipeline: could not write %s (%s: %s)", self.plan.run_dir / reports.REPORT_FILE,
                           type(err).__name__, err)
        else:
            logger.info("herd.pipeline: report: %s", path)
        return summary

    def _run_step(self, step: Step, resume: bool) -> dict[str, Any]:
        orphan = running_pid(step.dir / STEP_PID)
        if orphan is not None:
            raise StepStillRunning(step, orphan)
        if not resume and step.dir.exists():
            _empty(step.dir, keep={f"seed{run.seed}" for run in step.average_of})
        step.dir.mkdir(parents=True, exist_ok=True)
        how = "continuing in its folder" if resume else "starting"
        logger.info("herd.pipeline: %s: %s\n  %s", step.name, how, " ".join(step.command))
        record = {"name": step.name, "tool": step.tool, "command": _command_key(step.command), "status": "running",
                  "started": datetime.now().isoformat(timespec="seconds"), "output": str(step.output)}
        write_record(step.dir / STEP_FILE, record)
        try:
            finished = run_logged(step.command, step.dir / STEP_LOG, cwd=repo_root(), pid_file=step.dir / STEP_PID)
        except KeyboardInterrupt as err:
            how = signal.Signals(err.signum).name if isinstance(err, Interrupted) else "SIGINT"
            write_record(step.dir / STEP_FILE, record | {"status": "interrupted", "signal": how,
                                                         "ended": datetime.now().isoformat(timespec="seconds")})
            raise
        status, seconds, cpu_seconds = finished.status, finished.seconds, finished.cpu_seconds
        if status == 0 and not TOOLS[step.tool].complete(step.output):
            logger.error("herd.pipeline: %s exited 0 but its output %s is not complete", step.name, step.output)
            status = 1
        record |= {"seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1), "exit_status": status}
        if status != 0:
            write_record(step.dir / STEP_FILE, record | {"status": "failed"})
            raise StepFailed(step, status)
        record |= {"status": "finished", "metrics": step_metrics(step, self.records)}
        write_record(step.dir / STEP_FILE, record)
        logger.info("herd.pipeline: %s finished in %.0f s -> %s", step.name, seconds, step.output)
        return record

    def write_summary(self, status: str, failed: str | None = None) -> dict[str, Any]:
        """Write ``summary.json`` (every step so far, and the per-round report) and return it."""
        steps = [{"name": s.name, "tool": s.tool, "output": str(s.output),
                  "status": self.records[s.name].get("status") if s.name in self.records else "pending",
                  "skipped": bool(self.records.get(s.name, {}).get("skipped")),
                  "seconds": self.records.get(s.name, {}).get("seconds"),
                  "metrics": self.records.get(s.name, {}).get("metrics", {})} for s in self.plan.steps]
        final = self.plan.final_model()
        summary = {"pipeline": self.plan.cfg.get("name"), "run_dir": str(self.plan.run_dir),
                   "start": self.plan.cfg.get("start"), "final_model": None if final is None else str(final),
                   "status": status, "failed_step": failed,
                   "started": self.started, "updated": datetime.now().isoformat(timespec="seconds"),
                   "rounds": report(self.plan, self.records), "steps": steps}
        write_record(self.plan.run_dir / SUMMARY_FILE, summary)
        return summary


def _empty(folder: Path, keep: set[str] = frozenset()) -> None:
    """Remove what a folder holds (the seed runs of an average step stay: they are steps of their own)."""
    for child in folder.iterdir():
        if child.name in keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# --- metrics and the report ---------------------------------------------------------------------


def step_metrics(step: Step, records: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Key figures of a finished step: the end (and start) of a training run's val scalars, a
    rejection-sampling run's stats, the size of prepared data; an average step's are the mean of
    its runs' (``runs`` says how many)."""
    if step.average_of:
        runs = [records.get(r.name, {}).get("metrics", {}) for r in step.average_of]
        keys = sorted(set().union(*runs))
        out = {k: sum(r[k] for r in runs if k in r) / sum(k in r for r in runs) for k in keys}
        return out | {"runs": float(len(runs))}
    if step.tool == "train":
        return training_metrics(step.dir / "tensorboard")
    if step.tool == "rejection_sample":
        stats = json.loads((step.output / "stats.json").read_text())
        return flat_scalars({k: v for k, v in stats.items() if k != "options"})
    if step.tool == "command":
        return command_metrics(step)
    if step.tool == "prepare":
        manifest = json.loads((step.output / "manifest.json").read_text())
        out = {}
        for name, source in manifest.get("sources", {}).items():
            splits = source.get("splits", {})
            for split, entry in splits.items():
                out[f"{name}/{split}/rows"] = float(entry.get("rows", entry.get("examples", 0)))  # media: examples
            out[f"{name}/documents"] = float(source_documents(source))
        return out
    return {}


def command_metrics(step: Step) -> dict[str, float]:
    """A command step's figures: the last value of each scalar in ``<step folder>/tensorboard`` (what
    ``herd.evaluate`` writes there), and the numbers of its output when that is a JSON object file."""
    out: dict[str, float] = {}
    board = step.dir / "tensorboard"
    if board.is_dir():
        out |= {tag: values[-1].value for tag, values in read_scalars(board).items() if values}
    if step.output.suffix == ".json" and step.output.is_file():
        try:
            data = json.loads(step.output.read_text())
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict):
            out |= flat_scalars(data)
    return out


def source_documents(source: Mapping[str, Any]) -> int:
    """A prepared source's documents: text and dialogs count ``documents``; preference rankings and media
    count ``examples`` (a ranking, a captioned image: one document of the packed rows each); else the
    splits' ``documents``."""
    for key in ("documents", "examples"):
        if source.get(key) is not None:
            return int(source[key])
    return int(sum(entry.get("documents", 0) for entry in source.get("splits", {}).values()))


def training_metrics(folder: Path) -> dict[str, float]:
    """The last value of every ``val/*`` scalar and of ``train/loss``, and the first of each ``val/*``
    (``<tag>@start``: before training), from a run's TensorBoard events."""
    if not folder.is_dir():
        return {}
    out = {}
    for tag, values in read_scalars(folder).items():
        if not (tag.startswith("val/") or tag == "train/loss"):
            continue
        out[tag] = values[-1].value
        if tag.startswith("val/") and len(values) > 1:
            out[f"{tag}@start"] = values[0].value
    return out


def report(plan: Plan, records: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per round (0 = setup): the round's wall and CPU seconds and the pipeline's ``report`` columns.

    A column ``step/metric`` reads ``metric`` of the step named ``step`` in that round, else of its
    per-round finish step (and in row 0, of the setup step).
    """
    wanted = plan.cfg.get("report")
    columns = OmegaConf.to_container(wanted, resolve=False) if OmegaConf.is_config(wanted) else dict(wanted or {})
    rows = []
    for number in range(plan.rounds + 1):
        prefix = "setup" if number == 0 else f"round{number}"
        mine = [s for s in plan.steps if s.name.startswith(prefix + "/") and s.name.count("/") == 1]
        row: dict[str, Any] = {"round": number}
        for key in ("seconds", "cpu_seconds"):
            values = [records[s.name][key] for s in mine if records.get(s.name, {}).get(key) is not None]
            row[key] = round(sum(values), 1) if values else None
        for label, source in columns.items():
            step_name, _, metric = str(source).partition("/")
            names = [f"{prefix}/{step_name}", f"finish/round{number}/{step_name}"]
            values = [records[n].get("metrics", {}).get(metric) for n in names if n in records]
            row[label] = next((v for v in values if v is not None), None)
        rows.append(row)
    return rows


def format_report(rows: Sequence[Mapping[str, Any]]) -> str:
    """The per-round rows as a plain text table."""
    if not rows:
        return ""
    columns = list(rows[0])

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    table = [columns] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(text.rjust(width) for text, width in zip(line, widths, strict=True)) for line in table)


# --- report.md ----------------------------------------------------------------------------------

ROUNDS_FIGURE = "report_rounds.png"
TRAINING_FIGURE = "report_training.png"
SAMPLE_ANSWERS = 3


def write_report(plan: Plan, summary: Mapping[str, Any]) -> Path:
    """``report.md`` in the run folder: the final model, the per-round table and its figure, every training
    step's curves, held-out answers of the first and the last policy, and every step with its folders."""
    base = plan.run_dir
    lines = [f"# herd.pipeline: {summary.get('pipeline')} ({summary.get('status')})", ""]
    final = summary.get("final_model")
    if final is not None:
        ready = Path(final).exists()
        lines.append(f"- **final model**: {reports.link(final, base)}" + ("" if ready else " (not written yet)"))
        if ready:
            lines.append(f"  - chat with it: `python -m herd.chat model_dir={final}`")
    if summary.get("failed_step"):
        lines.append(f"- **failed step**: {summary['failed_step']} (its log: "
                     f"{reports.link(plan.by_name[summary['failed_step']].dir / STEP_LOG, base)})")
    steps = summary.get("steps", [])
    seconds = sum(s.get("seconds") or 0 for s in steps)
    lines += [f"- start: `{summary.get('start')}`",
              f"- run folder: `{base}`; started {summary.get('started')}, updated {summary.get('updated')}; "
              f"the steps' wall time {seconds / 60:.1f} min",
              f"- TensorBoard (every step): `tensorboard --logdir {base}`",
              f"- numbers: {reports.link(base / SUMMARY_FILE, base)}", ""]
    rows = summary.get("rounds") or []
    if rows:
        columns = list(rows[0])
        lines += ["## Per round", "", "Round 0 is the setup (and the policy entering round 1 for the finish steps).",
                  "", *reports.table(rows, columns), ""]
        figure = _rounds_figure(rows, base / ROUNDS_FIGURE)
        if figure is not None:
            lines += [f"![per-round figures]({reports.relative(figure, base)})", ""]
    training = _training_figure(plan, base / TRAINING_FIGURE)
    if training is not None:
        lines += ["## Training curves", "",
                  "train/loss (lines) and val/loss (points) of every training step, by round.", "",
                  f"![training curves]({reports.relative(training, base)})", ""]
    lines += answer_samples(plan)
    lines += ["## Steps", ""]
    done = {s["name"]: s for s in steps}
    table = []
    for step in plan.steps:
        record = done.get(step.name, {})
        metrics = record.get("metrics") or {}
        loss = (f"{metrics['val/loss@start']:.4g} -> {metrics['val/loss']:.4g}" if "val/loss@start" in metrics
                else reports.number(metrics.get("val/loss")))
        board = step.dir / "tensorboard"
        table.append({"step": step.name, "tool": step.tool, "status": record.get("status", "pending"),
                      "seconds": record.get("seconds"), "val/loss": loss,
                      "output": _path_link(step.output, base),
                      "TensorBoard": reports.link(board, base, "tensorboard") if board.is_dir() else "-",
                      "log": reports.link(step.dir / STEP_LOG, base, "step.log") if (step.dir / STEP_LOG).exists()
                      else "-"})
    lines += reports.table(table, ["step", "tool", "status", "seconds", "val/loss", "output", "TensorBoard", "log"])
    return reports.write(base / reports.REPORT_FILE, lines)


def _path_link(path: Path, base: Path) -> str:
    inside = base.resolve() in path.resolve().parents
    return reports.link(path, base) if inside and path.exists() else f"`{path}`"


def _rounds_figure(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """One small plot per report column with a number in some round, the round on the x axis."""
    numbers = [c for c in rows[0] if c not in ("round", "seconds", "cpu_seconds")
               and any(isinstance(r.get(c), int | float) and not isinstance(r.get(c), bool) for r in rows)]
    if not numbers:
        path.unlink(missing_ok=True)
        return None
    figure, axes = reports.grid(len(numbers))
    rounds = [int(r["round"]) for r in rows]
    for axis, column in zip(axes, numbers, strict=True):
        points = [(r["round"], r[column]) for r in rows if isinstance(r.get(column), int | float)]
        axis.plot([p[0] for p in points], [p[1] for p in points], "o-")
        axis.set_title(column)
        axis.set_xticks(rounds)
        axis.set_xlabel("round")
        axis.grid(alpha=0.3)
    return reports.save(figure, path)


def _training_figure(plan: Plan, path: Path) -> Path | None:
    """Per training step name (sft, reward, dpo...): each run's train/loss, and its val/loss as points."""
    groups: dict[str, list[tuple[Step, dict]]] = {}
    for step in plan.steps:
        board = step.dir / "tensorboard"
        if step.tool != "train" or step.average_of or not board.is_dir():
            continue
        scalars = read_scalars(board)
        if scalars.get("train/loss") or scalars.get("val/loss"):
            groups.setdefault(step.short, []).append((step, scalars))
    if not groups:
        path.unlink(missing_ok=True)
        return None
    figure, axes = reports.grid(len(groups))
    for axis, (short, runs) in zip(axes, groups.items(), strict=True):
        for step, scalars in runs:
            label = step.name.replace(f"/{short}", "", 1)  # setup, round2, round2/seed1
            train = scalars.get("train/loss", [])
            line, = axis.plot([s.step for s in train], [s.value for s in train], lw=1, label=label)
            val = scalars.get("val/loss", [])
            axis.plot([s.step for s in val], [s.value for s in val], "o--", color=line.get_color(), ms=4, lw=0.8)
        axis.set_title(short)
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return reports.save(figure, path)


def answer_samples(plan: Plan, count: int = SAMPLE_ANSWERS) -> list[str]:
    """Markdown: the first ``count`` held-out prompts of each per-round ``rejection_sample`` finish step,
    answered by the round-0 policy and by the last round's, with their rewards (from ``sft.jsonl``)."""
    if plan.rounds == 0:
        return []
    out = []
    finish = [s for s in plan.steps if s.section == "finish" and s.tool == "rejection_sample"
              and s.spec is not None and s.spec.get("per_round")]
    for short in dict.fromkeys(s.short for s in finish):
        first = plan.by_name.get(f"finish/round0/{short}")
        last = plan.by_name.get(f"finish/round{plan.rounds}/{short}")
        if first is None or last is None:
            continue
        before, after = _answers(first.output / "sft.jsonl"), _answers(last.output / "sft.jsonl")
        shared = [key for key in before if key in after][:count]
        if not shared:
            continue
        out += [f"## Held-out answers before and after ({short})", "",
                f"The first {len(shared)} prompts of {reports.link(first.output, plan.run_dir, first.name)}: the "
                f"policy entering round 1 (round 0) against the last round's (round {plan.rounds}), each answer "
                "with the reward the last reward model gave it.", ""]
        for key in shared:
            question, answer, reward = before[key]
            _, later, later_reward = after[key]
            out += [f"**{key}**", "", *reports.code_block(question), "",
                    f"round 0 (reward {reports.number(reward)}):", "", *reports.code_block(answer), "",
                    f"round {plan.rounds} (reward {reports.number(later_reward)}):", "", *reports.code_block(later), ""]
    return out


def _answers(path: Path) -> dict[str, tuple[str, str, float | None]]:
    """``{id: (the last user message, the answer, its reward)}`` of an ``sft.jsonl``, in file order."""
    if not path.is_file():
        return {}
    out = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        try:
            record = json.loads(line)
            messages = record["messages"]
            question = next(m["content"] for m in reversed(messages[:-1]) if m["role"] == "user")
        except (ValueError, KeyError, TypeError, StopIteration):
            continue
        out[str(record.get("id", number))] = (str(question), str(messages[-1]["content"]), record.get("reward"))
    return out


# --- entry point --------------------------------------------------------------------------------


def plan_from(cfg: DictConfig) -> Plan:
    """The resolved plan of a composed pipeline config (every command built, every reference checked)."""
    if cfg.get("start") is None:
        raise PipelineError("start is required: the model the pipeline starts from, e.g. "
                            "start=logs/pretrain/runs/<run>/export")
    start = resolve(str(cfg.start))
    if not start.exists():
        raise PipelineError(f"start={cfg.start}: {start} does not exist")
    try:
        start = gguf.model_dir(start)  # a .gguf file: its converted directory, which every step reads
    except (OSError, ValueError) as err:
        raise PipelineError(f"start={cfg.start}: {err}") from None
    with open_dict(cfg):
        cfg.start = str(start)  # steps run from the repository root: hand them an absolute path
    if cfg.get("policy_step") is None and cfg.get("rounds", 0):
        raise PipelineError("policy_step is required: the round step whose output is the next round's policy")
    plan = Plan(cfg, Path(str(cfg.run_dir)))
    plan.resolve_all()
    until = cfg.get("until")
    if until is not None and until not in plan.by_name:
        raise PipelineError(f"until={until}: no such step; the steps are {list(plan.by_name)}")
    plan.final_model()  # a final_model that names no step is a config mistake too
    return plan


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the configured pipeline (or only print its commands with ``dry_run``); returns the summary."""
    plan = plan_from(cfg)
    if cfg.get("dry_run"):
        for step in plan.steps:
            print(f"{step.name}:\n  {' '.join(step.command)}")
        final = plan.final_model()
        if final is not None:
            print(f"final model: {final}")
        return {"steps": [s.name for s in plan.steps], "final_model": None if final is None else str(final)}
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    logger.info("herd.pipeline: %d steps into %s", len(plan.steps), plan.run_dir)
    summary = Runner(plan, cfg.get("until")).run()
    logger.info("herd.pipeline: %s; summary: %s\n%s\nTensorBoard: tensorboard --logdir %s", summary["status"],
                plan.run_dir / SUMMARY_FILE, format_report(summary["rounds"]), plan.run_dir)
    if summary["final_model"] is not None and summary["status"] == "finished":
        logger.info("herd.pipeline: final model: %s\n  chat with it: python -m herd.chat model_dir=%s",
                    summary["final_model"], summary["final_model"])
    return summary


@hydra.main(version_base="1.3", config_path=str(repo_root() / "configs"), config_name="pipeline")
def main(cfg: DictConfig) -> None:
    """Command-line entry: a config mistake exits with status 2, a failed step with status 1."""
    try:
        with cli.user_errors("herd.pipeline", (PipelineError,)):
            run(cfg)
    except StepFailed as err:
        logger.error("herd.pipeline: %s. Fix the cause and run the same command again: the finished steps are "
                     "skipped, and %s continues in its folder.", err, err.step.name)
        sys.exit(1)
    except KeyboardInterrupt as err:
        signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
        logger.error("herd.pipeline: interrupted (%s); run the same command again to resume",
                     signal.Signals(signum).name)
        sys.exit(128 + signum)


if __name__ == "__main__":
    main()

"""Rejection sampling: K answers per prompt from a policy, the best kept by a reward model.

    python -m herd.rejection_sample policy=<model dir> reward_model=<reward dir> output_dir=<dir>
    python -m herd.rejection_sample policy=... reward_model=... prompts=questions.jsonl num_samples=30
    python -m herd.rejection_sample policy=... reward_model=... split=val num_samples=1 temperature=0
    torchrun --nproc-per-node 8 -m herd.rejection_sample policy=... reward_model=... output_dir=...

This is the data step of each Llama 3 post-training round: the current policy answers every
prompt ``num_samples`` times (K, 10 to 30 in the paper), the reward model scores each answer, and
the best answer becomes SFT data. The best and the worst answers of a prompt also make a
preference pair for DPO.

How it runs, on each rank:

1. **Sample.** The policy answers ``batch_size`` prompts at a time in the Llama 3 chat format.
   Each prompt is encoded and prefilled once; its K samples continue from that one prefill in
   one KV cache (:func:`herd.model.generate`, ``num_samples=K``). Prompts are batched by length.
2. **Score.** The policy is freed and the reward model scores every usable answer as the dialog
   ``prompt + [answer]``, ``score_batch_size`` dialogs per forward pass, sorted by length
   (:func:`herd.inference.score_dialogs`).
3. **Select.** A prompt keeps its highest-reward answer (the first one on a tie). Candidates are
   the usable answers: non-empty text, within the reward model's context, and finished with an
   end-of-turn token (unless ``keep_unfinished=true``; an answer cut at ``max_new_tokens`` would
   teach the policy to stop mid-sentence). The worst candidate whose text differs from the best
   one is the rejected response when ``best - worst > min_margin``; otherwise the prompt gives
   no pair (all its answers tie).

The judge (``judge``) is the reward model by default. ``judge=answer_f1`` rates each answer by its
token F1 against the prompt's reference answer instead (every prompt must have one; ``reward_model``
is not read): a stand-in for the people who rank each round's samples in the paper, so that a
pipeline can train its reward model on rankings of the current policy's own answers.

Several ranks (``torchrun``, or any launcher that sets ``RANK``/``WORLD_SIZE``): rank r takes
prompts r, r + W, r + 2W, ... Each rank writes its results to ``parts/``; rank 0 merges them in
prompt order once every rank is done, so the output is the same file whatever the number of
ranks. The output folder must be on a filesystem that every rank sees.

Prompts (``prompts``):

- ``stdlib:sft`` (and its options, ``stdlib:sft?seed=1&per_definition=2``): the embedded
  questions about the standard library. ``split`` picks the modules that ``herd.prepare`` puts in
  the train split (the default) or the held-out ``val`` modules, with ``val_fraction``.
- a jsonl file, one prompt per line: ``{"messages": [...]}`` ending with a user message, or
  ``{"prompt": "text" or [messages]}``, with an optional ``id`` and ``group``. A line whose
  messages end with an assistant message uses the messages before it as the prompt, and the
  answer as the reference. Every line is used unless ``split`` is given.

``shuffle`` (seeded by ``seed``), ``offset`` and ``max_prompts`` then take a slice of the prompts,
so that successive rounds can sample disjoint prompts from one set.

Outputs in ``output_dir``:

- ``sft.jsonl``: ``{"id", "group", "messages": prompt + [best answer], "reward"}`` per kept
  prompt, the dialog format that ``herd.prepare`` reads (``kind: dialog``);
- ``preferences.jsonl``: ``{"id", "group", "prompt": [messages], "responses": [{"content": best,
  "rank": 0, "reward"}, {"content": worst, "rank": 1, "reward"}]}`` per prompt with a pair, the
  preference format of ``herd.prepare`` (``kind: preference``);
- ``samples.jsonl`` (``save_samples=true``): every answer of every prompt with its reward;
- ``stats.json``: the mean reward of a single sample against the mean reward of the kept best,
  the spread (best minus worst per prompt), how many prompts were kept and why others were not,
  the token F1 of the answers against the references when the prompts have them, and timings.
  It is written last: its presence means the outputs are complete. With fewer than ``min_kept``
  SFT lines or pairs (pairs only when ``num_samples > 1``) it is not written and the command fails (exit status 2), saying why answers
  were skipped, since the data steps after it would have nothing to train on.
- ``tensorboard/``: the same figures as scalars (``rejection_sampling/...``), as scoring goes.

The reward model must use the policy's tokenizer (checked by fingerprint). Mistakes in the options,
the models or the prompts are reported as ``herd.rejection_sample: <message>`` with exit status 2.
"""

from __future__ import annotations

import gc
import heapq
import json
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from herd.cli import user_errors
from herd.data.chat import ChatFormat, chat_format
from herd.data.inputs import BadInputError, jsonl_records
from herd.data.kinds import assign_split
from herd.data.kinds.dialog import STDLIB_SFT, checked_messages, sft_options
from herd.data.tokenizer import Tokenizer
from herd.dtypes import FP32_BF16
from herd.evaluation.answers import token_f1
from herd.inference import (
    decode_answers,
    load,
    load_reward_model,
    load_tokenizer,
    score_dialogs,
)
from herd.logs import Progress
from herd.paths import resolve
from herd.presets import config_dir
from herd.scalars import flat_scalars

logger = logging.getLogger(__name__)

Messages = list[dict[str, Any]]
# Rewards of dialogs (each a prompt and one assistant answer), in order.
Scorer = Callable[[Sequence[Messages]], list[float]]
SPLITS = ("train", "val", "all")
# Who scores the answers: the reward model, or token F1 against each prompt's reference answer.
JUDGES = ("reward_model", "answer_f1")
OUTPUTS = ("sft.jsonl", "preferences.jsonl", "samples.jsonl")
STATS_FILE = "stats.json"
PARTS = "parts"
TAG = "rejection_sampling"


class RejectionSampleError(ValueError):
    """An option, model or prompt file that cannot be used; the message names it and the fix."""


# --- prompts ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """A dialog to answer (ending with a user message), its id, group and reference answer (if any)."""

    id: str
    messages: Messages
    group: str | None = None
    reference: str | None = None


def read_prompts(source: str, split: str | None = None, val_fraction: float = 0.02) -> list[Prompt]:
    """The prompts of ``stdlib:sft`` (``split`` defaults to train) or of a jsonl file (every line).

    ``split`` = train/val keeps the prompts whose group (else id) ``herd.prepare`` would assign to
    that split with ``val_fraction``; ``all`` keeps every prompt.
    """
    if split is not None and split not in SPLITS:
        raise RejectionSampleError(f"split={split!r}: use one of {SPLITS}, or null")
    if source == STDLIB_SFT or source.startswith(STDLIB_SFT + "?"):
        prompts = _stdlib_prompts(source)
        split = split or "train"
    else:
        prompts = _file_prompts(resolve(source))
        split = split or "all"
    if split != "all":
        prompts = [p for p in prompts if assign_split(p.group or p.id, val_fraction) == split]
    return prompts


def _stdlib_prompts(source: str) -> list[Prompt]:
    from herd.data.embedded.sft import stdlib_sft

    try:
        options = sft_options(source)
    except ValueError as err:
        raise RejectionSampleError(f"prompts: {err}") from None
    return [Prompt(d.id, list(d.messages[:-1]), d.group, d.messages[-1]["content"]) for d in stdlib_sft(**options)]


def _file_prompts(path: Path) -> list[Prompt]:
    if not path.is_file():
        raise RejectionSampleError(f"prompts={path}: no such file; give a jsonl file of prompts or {STDLIB_SFT}")

    def refuse(error: BadInputError) -> None:
        raise RejectionSampleError(str(error))

    prompts = []
    for line, record in jsonl_records(path, refuse, "'messages' or 'prompt'"):
        where = f"{path}:{line}"
        messages = record.get("messages", record.get("prompt"))
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not isinstance(messages, list) or not messages:
            raise RejectionSampleError(f"{where}: expected 'messages' (a list of messages) or 'prompt' (a string or "
                                       "a list of messages)")
        reference = None
        if isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            reference, messages = messages[-1].get("content"), messages[:-1]
        try:  # checked as a dialog with a stand-in answer: roles, contents and flags are validated
            checked = checked_messages([*messages, {"role": "assistant", "content": "-"}], where)[:-1]
        except BadInputError as err:
            raise RejectionSampleError(str(err)) from None
        if not checked or checked[-1]["role"] != "user":
            raise RejectionSampleError(f"{where}: the prompt must end with a user message")
        group = record.get("group")
        prompts.append(Prompt(str(record.get("id") or f"{path.name}:{line}"), checked,
                              group if isinstance(group, str) and group else None, reference))
    return prompts


def take(prompts: Sequence[Prompt], shuffle: bool, seed: int, offset: int, limit: int | None) -> list[Prompt]:
    """``limit`` prompts from ``offset`` on, after a shuffle seeded by ``seed`` (if ``shuffle``)."""
    ordered = list(prompts)
    if shuffle:
        random.Random(f"herd.rejection_sample:{seed}").shuffle(ordered)
    return ordered[offset : None if limit is None else offset + limit]


def rank_share(count: int, rank: int, world_size: int) -> range:
    """The prompt indices of ``rank``: rank, rank + world_size, ..."""
    return range(rank, count, world_size)


# --- sampling and selection ---------------------------------------------------------------------


@dataclass
class Sample:
    """One answer: its text, whether it ended with a stop token, its reward and why it is unusable."""

    text: str
    finished: bool
    reward: float | None = None
    unusable: str | None = None  # empty, binary, too_long, or None


@dataclass
class Result:
    """One prompt's samples and what was kept: the best and worst sample (indices), or why not."""

    index: int
    prompt: Prompt
    samples: list[Sample] = field(default_factory=list)
    best: int | None = None
    worst: int | None = None
    skipped: str | None = None  # prompt_too_long, no_usable_sample; no_pair (kept for SFT, no pair)

    def to_record(self) -> dict[str, Any]:
        """The JSON line of a part file (and of samples.jsonl)."""
        return {"index": self.index, "id": self.prompt.id, "group": self.prompt.group,
                "messages": self.prompt.messages, "reference": self.prompt.reference,
                "samples": [vars(s) for s in self.samples], "best": self.best, "worst": self.worst,
                "skipped": self.skipped}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Result:
        """Inverse of :meth:`to_record`."""
        prompt = Prompt(record["id"], record["messages"], record["group"], record["reference"])
        return cls(record["index"], prompt, [Sample(**s) for s in record["samples"]], record["best"],
                   record["worst"], record["skipped"])


def select(result: Result, min_margin: float = 0.0, keep_unfinished: bool = False) -> Result:
    """Set ``best``, ``worst`` and ``skipped`` of a scored result (see the module docstring)."""
    candidates = [i for i, s in enumerate(result.samples)
                  if s.reward is not None and (s.finished or keep_unfinished)]
    result.best = result.worst = None
    if result.skipped == "prompt_too_long":
        return result
    if not candidates:
        result.skipped = "no_usable_sample"
        return result
    best = max(candidates, key=lambda i: (result.samples[i].reward, -i))  # the first of equal rewards
    result.best, result.skipped = best, None
    others = [i for i in candidates if result.samples[i].text != result.samples[best].text]
    if others:
        worst = min(others, key=lambda i: (result.samples[i].reward, i))
        if result.samples[best].reward - result.samples[worst].reward > min_margin:
            result.worst = worst
    if result.worst is None:
        result.skipped = "no_pair"
    return result


def generate_answers(model, chat: ChatFormat, prompts: Sequence[Prompt], *, num_samples: int,
                     max_new_tokens: int, temperature: float, top_p: float, top_k: int, batch_size: int,
                     generator: torch.Generator | None, progress: Progress | None = None) -> list[list[Sample] | None]:
    """K samples of each prompt (None for a prompt that leaves no room to answer in the context).

    Prompts are sorted by length and decoded ``batch_size`` at a time, each prefilled once.
    """
    encoded = [chat.prompt_ids(p.messages) for p in prompts]
    out: list[list[Sample] | None] = [None] * len(prompts)
    fitting = [i for i, ids in enumerate(encoded) if len(ids) < model.config.max_seq_len]
    answers = decode_answers(model, chat.tokenizer, [encoded[i] for i in fitting], max_new_tokens,
                             stop_ids=chat.stop_ids, num_samples=num_samples, batch_size=batch_size,
                             on_batch=None if progress is None else progress.update, temperature=temperature,
                             top_p=top_p, top_k=top_k, generator=generator)
    for i, samples in zip(fitting, answers, strict=True):
        out[i] = [Sample(answer.text.strip(), answer.finished) for answer in samples]
    if progress is not None and len(fitting) < len(prompts):
        progress.update(len(prompts) - len(fitting))
    return out


def score_results(results: Sequence[Result], scorer: Scorer, chat: ChatFormat, max_len: int | None,
                  chunk_prompts: int, on_chunk: Callable[[Sequence[Result]], None] | None = None) -> None:
    """Fill in each usable sample's reward, ``chunk_prompts`` prompts per call of ``scorer``."""
    for start in range(0, len(results), chunk_prompts):
        chunk = results[start : start + chunk_prompts]
        dialogs, targets = [], []
        for result in chunk:
            for sample in result.samples:
                dialog = _usable_dialog(result, sample, chat, max_len)
                if dialog is not None:
                    dialogs.append(dialog)
                    targets.append(sample)
        for sample, reward in zip(targets, scorer(dialogs) if dialogs else [], strict=True):
            sample.reward = float(reward)
        if on_chunk is not None:
            on_chunk(chunk)


def _usable_dialog(result: Result, sample: Sample, chat: ChatFormat, max_len: int | None) -> Messages | None:
    """The dialog to score, or None (with ``sample.unusable`` set) for an answer that cannot be kept."""
    dialog = [*result.prompt.messages, {"role": "assistant", "content": sample.text}]
    try:
        checked_messages(dialog, result.prompt.id)
    except BadInputError as err:
        sample.unusable = "empty" if err.reason == "empty_content" else err.reason
        return None
    if max_len is not None and len(chat.response_ids(dialog)) > max_len:
        sample.unusable = "too_long"
        return None
    return dialog


# --- statistics ---------------------------------------------------------------------------------


class Tally:
    """Running statistics over results (see ``stats.json`` in the module docstring)."""

    def __init__(self) -> None:
        self.prompts = self.samples = self.unfinished = self.kept_sft = self.kept_pairs = 0
        self.unusable: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.sample_rewards: list[float] = []
        self.best_rewards: list[float] = []
        self.worst_rewards: list[float] = []
        self.kept_sample_rewards: list[float] = []
        self.spreads: list[float] = []
        self.sample_f1: list[float] = []
        self.best_f1: list[float] = []

    def add(self, result: Result) -> None:
        """Count one selected result."""
        self.prompts += 1
        self.samples += len(result.samples)
        self.unfinished += sum(not s.finished for s in result.samples)
        self.unusable.update(s.unusable for s in result.samples if s.unusable)
        if result.best is None and result.skipped:
            self.skipped[result.skipped] += 1
        rewards = [s.reward for s in result.samples if s.reward is not None]
        self.sample_rewards += rewards
        if len(rewards) >= 2:
            self.spreads.append(max(rewards) - min(rewards))
        reference = result.prompt.reference
        if reference is not None:
            self.sample_f1 += [token_f1(s.text, reference) for s in result.samples]
        if result.best is not None:
            self.kept_sft += 1
            self.best_rewards.append(result.samples[result.best].reward)
            self.kept_sample_rewards += rewards
            if reference is not None:
                self.best_f1.append(token_f1(result.samples[result.best].text, reference))
        if result.worst is not None:
            self.kept_pairs += 1
            self.worst_rewards.append(result.samples[result.worst].reward)
        elif result.best is not None:
            self.skipped["no_pair"] += 1

    def summary(self) -> dict[str, Any]:
        """The figures of ``stats.json`` (means are null where nothing was counted)."""
        mean_best, mean_kept = _mean(self.best_rewards), _mean(self.kept_sample_rewards)
        out: dict[str, Any] = {
            "prompts": self.prompts,
            "samples": self.samples,
            "reward": {
                "mean_sample": _mean(self.sample_rewards),
                "std_sample": _std(self.sample_rewards),
                "mean_best": mean_best,
                "mean_sample_of_kept": mean_kept,
                "gain": None if mean_best is None or mean_kept is None else mean_best - mean_kept,
                "mean_worst": _mean(self.worst_rewards),
                "spread": _mean(self.spreads),
            },
            "kept": {"sft": self.kept_sft, "preferences": self.kept_pairs,
                     "fraction": self.kept_sft / self.prompts if self.prompts else None},
            "skipped_prompts": dict(sorted(self.skipped.items())),
            "unusable_samples": dict(sorted(self.unusable.items())),
            "unfinished_samples": self.unfinished,
        }
        if self.sample_f1:
            out["answer_f1"] = {"mean_sample": _mean(self.sample_f1), "mean_best": _mean(self.best_f1)}
        return out


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _std(values: Sequence[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# --- TensorBoard -----------------------------------------------------------------------


class Scalars:
    """TensorBoard scalars under ``rejection_sampling/`` (rank 0 only; nothing when disabled)."""

    def __init__(self, folder: Path | None) -> None:
        self.writer = None
        if folder is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder))

    def log(self, summary: dict[str, Any], step: int) -> None:
        """Write every number of ``summary`` at ``step``."""
        if self.writer is None:
            return
        for key, value in flat_scalars(summary).items():
            self.writer.add_scalar(f"{TAG}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()


# --- the run ------------------------------------------------------------------------------------


def distributed_rank() -> tuple[int, int]:
    """(rank, world size): an initialised process group's, else a launcher's ``RANK``/``WORLD_SIZE``.

    Under a launcher with more than one rank a gloo process group is started (for the barrier
    before rank 0 merges the parts).
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _device(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def check_options(cfg: DictConfig) -> None:
    """Refuse impossible values before any model is loaded."""
    positive = ("num_samples", "max_new_tokens", "batch_size", "score_batch_size")
    for key in positive:
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise RejectionSampleError(f"{key}={cfg[key]!r}: give a positive integer")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1 or cfg.top_k < 0:
        raise RejectionSampleError(f"temperature={cfg.temperature}, top_p={cfg.top_p}, top_k={cfg.top_k}: use "
                                   "temperature >= 0 (0: greedy), 0 < top_p <= 1 and top_k >= 0")
    if cfg.max_prompts is not None and cfg.max_prompts < 1 or cfg.offset < 0:
        raise RejectionSampleError(f"max_prompts={cfg.max_prompts}, offset={cfg.offset}: max_prompts must be "
                                   "positive (or null: all) and offset >= 0")
    if cfg.judge not in JUDGES:
        raise RejectionSampleError(f"judge={cfg.judge!r}: use one of {JUDGES}")
    if cfg.dtype not in FP32_BF16:
        raise RejectionSampleError(f"dtype={cfg.dtype!r}: use fp32 or bf16")
    if cfg.temperature == 0 and cfg.num_samples > 1:
        logger.warning("temperature=0 (greedy) with num_samples=%d: every sample of a prompt is the same answer",
                       cfg.num_samples)


def run(cfg: DictConfig, scorer: Scorer | None = None, rank: int | None = None,
        world_size: int | None = None) -> dict[str, Any] | None:
    """Sample, score, select and write (see the module docstring); rank 0 returns the stats.

    ``scorer`` replaces the judge (``reward_model`` is then not read): it maps dialogs to rewards.
    ``rank``/``world_size`` override the launcher's (every rank must be run, rank 0 last when there
    is no process group).
    """
    check_options(cfg)
    started = time.monotonic()
    if rank is None or world_size is None:
        rank, world_size = distributed_rank()
    output = resolve(str(cfg.output_dir))
    parts = output / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    part = parts / f"rank-{rank:05d}.jsonl"
    part.unlink(missing_ok=True)
    if rank == 0:
        (output / STATS_FILE).unlink(missing_ok=True)  # the outputs are incomplete until it is written again
    prompts = take(read_prompts(str(cfg.prompts), cfg.split, float(cfg.val_fraction)), bool(cfg.shuffle),
                   int(cfg.seed), int(cfg.offset), cfg.max_prompts)
    if not prompts:
        raise RejectionSampleError(f"prompts={cfg.prompts} (split={cfg.split}, offset={cfg.offset}) gives no prompts")
    mine = [Result(i, prompts[i]) for i in rank_share(len(prompts), rank, world_size)]
    if rank == 0:
        if int(cfg.num_samples) == 1:
            logger.info("answering %d prompts (one answer each, scored by the reward model) on %d rank(s) into %s",
                        len(prompts), world_size, output)
        else:
            logger.info("rejection sampling: %d prompts x %d samples on %d rank(s) into %s", len(prompts),
                        cfg.num_samples, world_size, output)
    if scorer is None and cfg.judge == "answer_f1":
        scorer = reference_scorer(mine)  # before sampling: a prompt without a reference is refused at once
    seconds, tokens = _sample(cfg, mine, rank)
    board = Scalars(output / "tensorboard" if rank == 0 and cfg.tensorboard else None)
    seconds["score"] = _score(cfg, mine, scorer, board, rank)
    with open(part, "w", encoding="utf-8") as f:
        for result in mine:
            f.write(json.dumps(result.to_record()) + "\n")
    _barrier()
    if rank != 0:
        return None
    files = [parts / f"rank-{r:05d}.jsonl" for r in range(world_size)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise RejectionSampleError(f"rank 0 finds no results of the other ranks in {missing}: every rank must "
                                   "write into the same output_dir (a filesystem they all see)")
    tally = merge(files, output, bool(cfg.save_samples))
    summary = tally.summary()
    _check_kept(summary, int(cfg.min_kept), cfg)
    board.log(summary, len(prompts))
    board.close()
    seconds["total"] = time.monotonic() - started
    summary |= {"samples_per_prompt": int(cfg.num_samples), "world_size": world_size,
                "tokens": {"generated_rank0": tokens, "per_second_rank0": tokens / max(seconds["generate"], 1e-9)},
                "seconds": seconds,
                "options": {k: None if OmegaConf.is_missing(cfg, k) else cfg[k]
                            for k in ("policy", "judge", "reward_model", "prompts", "split", "temperature",
                                      "top_p", "top_k", "max_new_tokens", "min_margin", "seed")}}
    _write_atomic(output / STATS_FILE, json.dumps(summary, indent=2) + "\n")
    for file in files:
        file.unlink()
    parts.rmdir()
    return summary


def _check_kept(summary: dict[str, Any], min_kept: int, cfg: DictConfig) -> None:
    """Refuse to finish with fewer than ``min_kept`` SFT lines or pairs: the next step would have no data."""
    kept = summary["kept"]
    pairs_possible = int(cfg.num_samples) > 1  # one answer per prompt (an evaluation) makes no pairs
    if kept["sft"] >= min_kept and (kept["preferences"] >= min_kept or not pairs_possible):
        return
    hints = []
    if summary["unfinished_samples"] and not cfg.keep_unfinished:
        hints.append(f"{summary['unfinished_samples']} of {summary['samples']} answers were cut at max_new_tokens="
                     f"{cfg.max_new_tokens} (raise it, or keep_unfinished=true)")
    if summary["skipped_prompts"].get("no_pair"):
        hints.append(f"{summary['skipped_prompts']['no_pair']} prompts' answers all tie (raise num_samples or "
                     "temperature, or lower min_margin)")
    raise RejectionSampleError(
        f"kept {kept['sft']} answers and {kept['preferences']} pairs of {summary['prompts']} prompts, fewer than "
        f"min_kept={min_kept}; skipped: {summary['skipped_prompts']}" + (f". {'; '.join(hints)}" if hints else "")
        + ". The outputs are written; stats.json is not, so a pipeline stops here")


def _sample(cfg: DictConfig, mine: list[Result], rank: int) -> tuple[dict[str, float], int]:
    """Generate this rank's samples with the policy, then free it."""
    loaded = load(str(cfg.policy), cfg.tokenizer, str(cfg.dtype), _device(str(cfg.device)),
                  chat_template=str(cfg.get("chat_template", "auto")))
    device = loaded.model.tok_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(int(cfg.seed) + rank)
    progress = Progress("sampling", len(mine), "prompts", 30.0, enabled=bool(cfg.progress) and rank == 0, bar=True,
                        logger=logger)
    answers = generate_answers(
        loaded.model, loaded.chat, [r.prompt for r in mine], num_samples=int(cfg.num_samples),
        max_new_tokens=int(cfg.max_new_tokens), temperature=float(cfg.temperature), top_p=float(cfg.top_p),
        top_k=int(cfg.top_k), batch_size=int(cfg.batch_size), generator=generator, progress=progress)
    for result, samples in zip(mine, answers, strict=True):
        if samples is None:
            result.skipped = "prompt_too_long"
        else:
            result.samples = samples
    seconds = {"generate": progress.close()}
    del loaded
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return seconds, progress.tokens


def _score(cfg: DictConfig, mine: list[Result], scorer: Scorer | None, board: Scalars, rank: int) -> float:
    """Score and select this rank's results; running figures go to TensorBoard (rank 0)."""
    tokenizer = load_tokenizer(str(cfg.policy), cfg.tokenizer)
    chat = chat_format(tokenizer, str(cfg.get("chat_template", "auto")))
    max_len = None
    if scorer is None:
        scorer, max_len = _reward_scorer(cfg, chat)
    progress = Progress("scoring", len(mine), "prompts", 30.0, enabled=bool(cfg.progress) and rank == 0, bar=True,
                        logger=logger)
    tally = Tally()

    def on_chunk(chunk: Sequence[Result]) -> None:
        for result in chunk:
            tally.add(select(result, float(cfg.min_margin), bool(cfg.keep_unfinished)))
        board.log(tally.summary(), tally.prompts)
        progress.update(len(chunk))

    per_call = max(1, int(cfg.score_batch_size) * 4 // int(cfg.num_samples))
    score_results(mine, scorer, chat, max_len, per_call, on_chunk)
    return progress.close()


def reference_scorer(results: Sequence[Result]) -> Scorer:
    """A scorer that rates an answer by its token F1 against its prompt's reference answer.

    It stands in for the people who rank a round's samples in the paper: ``judge=answer_f1`` with
    prompts that carry references (``stdlib:sft``, or jsonl lines ending with the assistant's answer).
    """
    references: dict[str, tuple[str, str]] = {}  # prompt -> (reference, id of the prompt that gave it)
    for result in results:
        prompt = result.prompt
        if prompt.reference is None:
            raise RejectionSampleError(f"judge=answer_f1 needs a reference answer for every prompt, and "
                                       f"{prompt.id!r} has none: use prompts whose messages end with the "
                                       "assistant's answer (or stdlib:sft), or judge=reward_model")
        key = _prompt_key(prompt.messages)
        reference, first = references.setdefault(key, (prompt.reference, prompt.id))
        if reference != prompt.reference:
            raise RejectionSampleError(f"judge=answer_f1: prompts {first!r} and {prompt.id!r} ask the same question "
                                       "with different reference answers, so an answer's F1 is ambiguous; keep one "
                                       "of them")

    def score(dialogs: Sequence[Messages]) -> list[float]:
        return [token_f1(dialog[-1]["content"], references[_prompt_key(dialog[:-1])][0]) for dialog in dialogs]

    return score


def _prompt_key(messages: Messages) -> str:
    return json.dumps(messages, sort_keys=True)


def _reward_scorer(cfg: DictConfig, chat: ChatFormat) -> tuple[Scorer, int]:
    """A scorer that runs the reward model, and its context length; its tokenizer must be the policy's."""
    tokenizer = chat.tokenizer
    path = resolve(str(cfg.reward_model))
    if (path / "tokenizer.json").is_file():
        fingerprint = Tokenizer.load(path).fingerprint
        if fingerprint != tokenizer.fingerprint:
            raise RejectionSampleError(f"reward_model={path} uses another tokenizer than the policy ({fingerprint[:12]}"
                                       f"... vs {tokenizer.fingerprint[:12]}...): it would read the answers as other "
                                       "tokens; train the reward model from the policy's family")
    else:
        logger.warning("%s has no tokenizer.json: herd cannot check that it shares the policy's tokenizer", path)
    model = load_reward_model(path, str(cfg.dtype), _device(str(cfg.device)))
    batch_size = int(cfg.score_batch_size)
    return (lambda dialogs: score_dialogs(model, chat, dialogs, batch_size)), model.config.max_seq_len


def _read_part(file: Path) -> Iterator[Result]:
    with open(file, encoding="utf-8") as lines:
        for line in lines:
            yield Result.from_record(json.loads(line))


def merge(files: Iterable[Path], output: Path, save_samples: bool) -> Tally:
    """Merge the ranks' part files (each in prompt order) into the outputs, in prompt order.

    Streams: one result per part file is in memory at a time. Returns the statistics of all results.
    """
    tally = Tally()
    handles = {name: open(output / f"{name}.tmp", "w", encoding="utf-8")  # noqa: SIM115 - closed below
               for name in OUTPUTS if name != "samples.jsonl" or save_samples}
    try:
        for result in heapq.merge(*(_read_part(f) for f in files), key=lambda r: r.index):
            tally.add(result)
            for name, line in output_lines(result).items():
                if name in handles:
                    handles[name].write(json.dumps(line) + "\n")
    finally:
        for handle in handles.values():
            handle.close()
    for name in OUTPUTS:
        if name in handles:
            (output / f"{name}.tmp").replace(output / name)
        else:
            (output / name).unlink(missing_ok=True)
    return tally


def output_lines(result: Result) -> dict[str, dict[str, Any]]:
    """The lines a selected result adds to sft.jsonl, preferences.jsonl and samples.jsonl."""
    prompt = result.prompt
    head = {"id": prompt.id, **({"group": prompt.group} if prompt.group else {})}
    lines: dict[str, dict[str, Any]] = {
        "samples.jsonl": {**head, "messages": prompt.messages, "best": result.best, "worst": result.worst,
                          "skipped": result.skipped,
                          "samples": [{"content": s.text, "reward": s.reward, "finished": s.finished,
                                       "unusable": s.unusable} for s in result.samples]}}
    if result.best is not None:
        best = result.samples[result.best]
        lines["sft.jsonl"] = {**head, "messages": [*prompt.messages, {"role": "assistant", "content": best.text}],
                              "reward": best.reward}
        if result.worst is not None:
            worst = result.samples[result.worst]
            lines["preferences.jsonl"] = {**head, "prompt": prompt.messages, "responses": [
                {"content": best.text, "rank": 0, "reward": best.reward},
                {"content": worst.text, "rank": 1, "reward": worst.reward}]}
    return lines


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def describe(summary: dict[str, Any]) -> str:
    """Two lines for the console: rewards of single samples vs kept best, and what was kept; with one
    answer per prompt (an evaluation: nothing is selected), the answers' mean reward and F1 instead."""
    if summary.get("samples_per_prompt") == 1:
        return describe_evaluation(summary)
    reward, kept = summary["reward"], summary["kept"]
    fmt = _fmt
    lines = [f"reward: single sample {fmt(reward['mean_sample'])}, kept best {fmt(reward['mean_best'])} "
             f"(spread {fmt(reward['spread'])})",
             f"kept {kept['sft']}/{summary['prompts']} prompts for SFT, {kept['preferences']} preference pairs"
             + (f"; skipped {summary['skipped_prompts']}" if summary["skipped_prompts"] else "")]
    if "answer_f1" in summary:
        f1 = summary["answer_f1"]
        lines.append(f"answer F1 vs references: single sample {fmt(f1['mean_sample'])}, kept best "
                     f"{fmt(f1['mean_best'])}")
    return "\n".join(lines)


def describe_evaluation(summary: dict[str, Any]) -> str:
    """An evaluation's lines (``num_samples=1``): the mean reward of the answers, their F1 against the
    references, and the prompts that got no scored answer (and why)."""
    reward = summary["reward"]
    spread = f" (sd {reward['std_sample']:.3f})" if reward.get("std_sample") is not None else ""
    lines = [f"answered {summary['prompts']} prompts, one answer each: mean reward {_fmt(reward['mean_sample'])}{spread}"]
    if "answer_f1" in summary:
        lines.append(f"answer F1 vs references: {_fmt(summary['answer_f1']['mean_sample'])}")
    unscored = {k: v for k, v in summary["skipped_prompts"].items() if k != "no_pair"}  # no pair: by design
    if unscored:
        lines.append(f"{sum(unscored.values())} prompts without a scored answer: {unscored}")
    if summary.get("unfinished_samples"):
        lines.append(f"{summary['unfinished_samples']} answers were cut at max_new_tokens")
    return "\n".join(lines)


USER_ERRORS = (RejectionSampleError, OSError, ValueError, MissingMandatoryValue)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="rejection_sample")
def main(cfg: DictConfig) -> None:
    """Command-line entry; user errors exit with status 2 and one message."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with user_errors("herd.rejection_sample", USER_ERRORS):
        summary = run(cfg)
    if summary is not None:
        print(f"herd.rejection_sample: {resolve(str(cfg.output_dir))}\n{describe(summary)}")


if __name__ == "__main__":
    main()

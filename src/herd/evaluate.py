"""Evaluate an exported model (herd's export or any Hugging Face Llama directory) from the command line.

Tasks are chosen by ``tasks=[...]`` (default ``[perplexity,needle,mcq]``)::

    python -m herd.evaluate model_dir=logs/pretrain/runs/<run>/export
    python -m herd.evaluate model_dir=/models/Llama-3.1-8B data_dir=/data/prepared/web tasks=[perplexity] \\
        device=cuda bf16=true
    python -m herd.evaluate model_dir=... tasks=[mcq] mcq.items=/data/my_questions.jsonl
    python -m herd.evaluate model_dir=... tasks=[needle] 'lengths=[8192,32768]' trials=10
    python -m herd.evaluate model_dir=... tasks=[reward_accuracy] reward_model=logs/reward/runs/<run>/export

- ``perplexity``: token-weighted loss and perplexity of each source's val split in ``data_dir``
  (:mod:`herd.evaluation.perplexity`);
- ``needle``: pass-key retrieval per depth and length (:mod:`herd.evaluation.needle`);
- ``mcq``: multiple-choice accuracy by log-likelihood, under permuted answer orders, prompt
  formats and answer labels, with the spread across them (:mod:`herd.evaluation.mcq`);
- ``reward_accuracy``: how often ``reward_model`` prefers the right response
  (:mod:`herd.evaluation.reward`); skipped, with the reason recorded, without a reward model.

``exclude=<contaminated.jsonl>`` (written by ``herd.curate``'s decontaminate block) leaves out the
items it lists from ``mcq`` and ``reward_accuracy``, matched by id (:mod:`herd.evaluation.exclude`);
each set records how many it left out (metric ``excluded``). ``perplexity`` and ``needle`` read
prepared data, whose documents are not named, and are not filtered.

Every number goes to ``<run folder>/results.json`` (schema in :mod:`herd.evaluation.results`) and
to TensorBoard (``<run folder>/tensorboard``); the needle table also to ``needle.json``. Two or
more results files are compared with::

    python -m herd.evaluate --compare logs/evaluate/<a>/results.json logs/evaluate/<b>/results.json
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import hydra
import torch
from omegaconf import DictConfig

from herd import logs
from herd.cli import user_errors
from herd.data.chat import chat_format
from herd.data.loaders.packed import PackedDataModule
from herd.data.manifest import Manifest
from herd.data.tokenizer import Tokenizer
from herd.evaluation import mcq as mcq_module
from herd.evaluation.batching import rows_per_batch
from herd.evaluation.exclude import Excluded, load_excluded
from herd.evaluation.needle import NeedleResult, collect_haystack, needle_accuracy
from herd.evaluation.perplexity import source_perplexities
from herd.evaluation.results import Results, compare_table, load_results
from herd.evaluation.reward import load_pairs, pairs_from_items, reward_accuracy
from herd.inference import load_model, load_reward_model, load_tokenizer
from herd.interop import gguf
from herd.logs import Progress
from herd.model.quantize import check_quantize
from herd.paths import resolve, resolve_location
from herd.presets import config_dir

logger = logs.get_logger(__name__)

T = TypeVar("T")
TASKS = ("perplexity", "needle", "mcq", "reward_accuracy")
DEFAULT_HOLDOUT_FRACTION = 0.02  # herd.prepare's default val_fraction


class Evaluation:
    """The model, tokenizer and settings shared by the tasks of one ``herd.evaluate`` run (loaded once)."""

    def __init__(self, cfg: DictConfig) -> None:
        check_quantize(cfg.get("quantize"))
        self.cfg = cfg
        self.excluded: Excluded | None = load_excluded(resolve(cfg.exclude)) if cfg.get("exclude") else None
        self.model_dir = gguf.model_dir(resolve(cfg.model_dir))  # a .gguf file: its converted directory
        self._model: torch.nn.Module | None = None
        self._tokenizer: Tokenizer | None = None

    @property
    def model(self) -> torch.nn.Module:
        """The model in float32 (bf16 runs use autocast), on ``device``, in eval mode."""
        if self._model is None:
            self._model = load_model(self.model_dir, "fp32", self.cfg.device, self.cfg.get("quantize"))
        return self._model

    @property
    def tokenizer(self) -> Tokenizer:
        """``tokenizer``, or the tokenizer saved in ``model_dir``."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_dir, self.cfg.tokenizer)
        return self._tokenizer

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when ``bf16=true``, else nothing."""
        return torch.autocast(torch.device(self.cfg.device).type, dtype=torch.bfloat16, enabled=bool(self.cfg.bf16))

    def leave_out(self, results: Results, task: str, items: Sequence[T], item_id: Callable[[T], str],
                  unit: str = "items") -> list[T]:
        """The items whose id ``exclude`` does not list; records (metric ``excluded``) and logs how many it
        left out of ``task``. Refuses to leave out every item. Without ``exclude``: the items."""
        if self.excluded is None:
            return list(items)
        kept, dropped = self.excluded.split(items, item_id)
        results.add(task, "excluded", len(dropped), len(items))
        logs.info(logger, f"herd.evaluate: {task}: left out {len(dropped)} of {len(items)} {unit} listed in "
                          f"{self.excluded.path}")
        if not kept:
            raise ValueError(f"exclude={self.excluded.path} lists every one of the {len(items)} {unit} of {task}: "
                             f"nothing is left to evaluate; evaluate another set, or exclude=null")
        return kept

    def batch_size(self, seq_len: int) -> int:
        """``batch_size``, or the memory rule of :mod:`herd.evaluation.batching` for rows of ``seq_len``."""
        if self.cfg.get("batch_size"):
            return int(self.cfg.batch_size)
        return rows_per_batch(self.model.config, seq_len, self.cfg.device)


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """The task names, refused with the list of known tasks when one is unknown or repeated."""
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or len(set(tasks)) != len(tasks) or not tasks:
        problem = f"{unknown} are not tasks" if unknown else "each task may be named once, and at least one"
        raise ValueError(f"tasks={tasks}: {problem}; choose from {list(TASKS)}, e.g. tasks=[perplexity,mcq]")
    return tasks


def evaluate(cfg: DictConfig) -> tuple[Results, dict[str, Any]]:
    """Run every task of ``cfg.tasks``; returns the rows and each task's own result object
    (``NeedleResult``, ``MCQResult``, per-source perplexities)."""
    tasks = check_tasks(cfg.tasks)
    run = Evaluation(cfg)
    results = Results(str(cfg.model_dir), int(cfg.seed))
    details: dict[str, Any] = {}
    for task in tasks:
        logs.info(logger, f"herd.evaluate: {task} ...")
        with run.autocast():
            details[task] = TASK_FUNCTIONS[task](run, results)
    return results, details


def perplexity_task(run: Evaluation, results: Results):
    """Loss, perplexity and greedy accuracy per source of ``data_dir``'s val split, and pooled (``all``)."""
    cfg = run.cfg.perplexity
    manifest = Manifest.load(resolve_location(str(run.cfg.data_dir)))
    seq_len = int(cfg.seq_len or min(manifest.row_len - 1, run.model.config.max_seq_len))
    found = source_perplexities(run.model, str(resolve(run.cfg.data_dir)), sources=cfg.sources, seq_len=seq_len,
                                batch_size=run.batch_size(seq_len))
    for name, result in found.items():
        results.add("perplexity", f"loss/{name}", result.loss, result.tokens)
        results.add("perplexity", f"perplexity/{name}", result.perplexity, result.tokens)
        results.add("perplexity", f"accuracy/{name}", result.accuracy, result.tokens)
    return found


def evaluate_needle(cfg: DictConfig) -> NeedleResult:
    """The needle task alone (the harness's original entry): load the model, score, return the table.

    ``quantize=fp8_rowwise`` scores the model with FP8 feed-forward layers (see :mod:`herd.model.quantize`).
    """
    run = Evaluation(cfg)
    with run.autocast():
        return needle_task(run, Results(str(cfg.model_dir), int(cfg.seed)))


def needle_task(run: Evaluation, results: Results) -> NeedleResult:
    """Pass-key retrieval on a haystack from ``data_dir``'s val split; ``lengths``, ``depths``, ``trials``."""
    cfg, model, tokenizer = run.cfg, run.model, run.tokenizer
    lengths = [int(n) for n in cfg.lengths]
    data = PackedDataModule(str(resolve(cfg.data_dir)), seq_len=max(lengths), batch_size=1, num_workers=0,
                            expected_vocab_size=model.config.vocab_size)  # refuses another tokenizer's data
    drop = [i for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None]
    haystack = collect_haystack(data.val_dataloader(), 2 * max(lengths), drop,
                                skip_rows_with=tokenizer.encode(" pass key"))
    found = needle_accuracy(model, tokenizer, haystack, lengths, list(cfg.depths), int(cfg.trials), int(cfg.seed))
    cells = len(found.lengths) * len(found.depths) * int(cfg.trials)
    results.add("needle", "accuracy/mean", found.mean, cells)
    for length in found.lengths:
        results.add("needle", f"accuracy/length={length}", found.at_length(length), len(found.depths) * int(cfg.trials))
    return found


def mcq_items(run: Evaluation) -> tuple[str, list[mcq_module.Item]]:
    """The item set's name and items: the embedded stdlib set or a jsonl file (``mcq.items``)."""
    cfg = run.cfg.mcq
    if str(cfg["items"]) != mcq_module.STDLIB_ITEMS:
        items = mcq_module.load_items(resolve(cfg["items"]))
        if cfg.max_items and len(items) > int(cfg.max_items):
            items = items[: int(cfg.max_items)]
        return Path(str(cfg["items"])).stem, items
    fraction = cfg.holdout_fraction
    if fraction is None:
        fraction = _data_val_fraction(run.cfg.data_dir)
    items = mcq_module.stdlib_items(holdout_fraction=float(fraction), seed=int(run.cfg.seed),
                                    max_items=int(cfg.max_items) if cfg.max_items else None)
    return "stdlib_docstrings", items


def _data_val_fraction(data_dir: str) -> float:
    """The val_fraction that prepared ``data_dir`` (so its val modules are the held-out ones); 0.02 without one."""
    try:
        return float(Manifest.load(resolve_location(str(data_dir))).data.get("val_fraction", DEFAULT_HOLDOUT_FRACTION))
    except (FileNotFoundError, ValueError, OSError):
        return DEFAULT_HOLDOUT_FRACTION


def mcq_task(run: Evaluation, results: Results) -> mcq_module.MCQResult:
    """Accuracy by log-likelihood under the robustness variants, with the spread across them."""
    cfg = run.cfg.mcq
    name, items = mcq_items(run)
    items = run.leave_out(results, f"mcq/{name}", items, lambda item: item.id)
    positions = min(len(item.choices) for item in items) if cfg.orders else 0
    variants = mcq_module.robustness_variants(list(cfg.formats), list(cfg.labels), positions)
    model = run.model

    def score(requests):
        longest = max(len(c) + len(t) for c, t in requests)
        progress = Progress("mcq", len(requests), "choices", float(run.cfg.progress_seconds))
        scores = mcq_module.continuation_logprobs(model, requests, run.batch_size(longest), progress=progress)
        progress.close()
        return scores

    found = mcq_module.evaluate_mcq(score, run.tokenizer, items, variants, name)
    for metric, value, n in found.metrics():
        results.add(f"mcq/{name}", metric, value, n)
    return found


def reward_accuracy_task(run: Evaluation, results: Results) -> dict[str, float] | None:
    """Preference accuracy of ``reward_model`` (in its tokenizer's chat format); skipped, with the reason in
    results.json, without one."""
    directory = run.cfg.get("reward_model")
    if not directory:
        reason = "no reward model given: set reward_model=<a reward model directory (stage=reward's export)>"
        return _skipped(results, "reward_accuracy", reason)
    directory = resolve(directory)
    reward_model = load_reward_model(directory, "fp32", run.cfg.device)
    tokenizer = Tokenizer.load(directory) if (directory / "tokenizer.json").is_file() else run.tokenizer
    pairs_source = str(run.cfg.reward_accuracy.pairs)
    if pairs_source == mcq_module.STDLIB_ITEMS:
        pairs = pairs_from_items(mcq_items(run)[1])
    else:
        pairs = load_pairs(resolve(pairs_source))
    pairs = run.leave_out(results, "reward_accuracy", pairs, lambda pair: pair.id, "pairs")
    chat = chat_format(tokenizer, str(run.cfg.get("chat_template", "auto")))
    accuracy, margin, n = reward_accuracy(reward_model, chat, pairs, batch_size=8)
    results.add("reward_accuracy", "accuracy", accuracy, n)
    results.add("reward_accuracy", "margin", margin, n)
    return {"accuracy": accuracy, "margin": margin, "n": n}


def _skipped(results: Results, task: str, reason: str) -> None:
    logs.warning(logger, f"herd.evaluate: skipping {task}: {reason}")
    results.skip(task, reason)
    return None


TASK_FUNCTIONS = {"perplexity": perplexity_task, "needle": needle_task, "mcq": mcq_task,
                  "reward_accuracy": reward_accuracy_task}


def report(cfg: DictConfig, results: Results, details: dict[str, Any]) -> str:
    """What a person reads after a run: each task's table."""
    lines = [f"herd.evaluate: {cfg.model_dir}"]
    if "perplexity" in details:
        lines.append(f"\nperplexity ({cfg.data_dir}, val split):")
        lines.append(f"  {'source':<10} {'loss':>8} {'ppl':>10} {'accuracy':>9} {'tokens':>9}")
        for name, found in details["perplexity"].items():
            lines.append(f"  {name:<10} {found.loss:>8.4f} {found.perplexity:>10.2f} {found.accuracy:>9.4f} "
                         f"{found.tokens:>9,}")
    if details.get("needle") is not None:
        found = details["needle"]
        lines.append(f"\nneedle in a haystack (mean {found.mean:.3f}):\n{found.table()}")
    if details.get("mcq") is not None:
        found = details["mcq"]
        lines.append(f"\nmcq {found.name}: {found.n_items} items x {len(found.variants)} variants, accuracy "
                     f"(chance {found.chance:.3f}):\n{found.table()}")
    if details.get("reward_accuracy") is not None:
        found = details["reward_accuracy"]
        lines.append(f"\nreward accuracy {found['accuracy']:.3f} (margin {found['margin']:.3f}, {found['n']} pairs)")
    for row in results.rows:
        if row.metric == "excluded":
            lines.append(f"\nexcluded from {row.task}: {int(row.value)} of {row.n} (listed in {cfg.exclude})")
    for skipped in results.skipped:
        lines.append(f"\nskipped {skipped['task']}: {skipped['reason']}")
    return "\n".join(lines)


def write_outputs(output_dir: Path, cfg: DictConfig, results: Results, details: dict[str, Any]) -> Path:
    """results.json, TensorBoard scalars, and needle.json when the needle task ran."""
    path = results.write_json(output_dir / "results.json")
    results.write_tensorboard(output_dir / "tensorboard")
    found = details.get("needle")
    if found is not None:
        (output_dir / "needle.json").write_text(json.dumps(
            {"model_dir": str(cfg.model_dir), "lengths": found.lengths, "depths": found.depths,
             "accuracy": found.accuracy.tolist(), "mean": found.mean}, indent=2) + "\n")
    return path


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Command-line entry; errors name the file or key and exit with status 2."""
    with user_errors("herd.evaluate", (FileNotFoundError, ValueError)):
        results, details = evaluate(cfg)
    print(report(cfg, results, details))
    output_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    path = write_outputs(output_dir, cfg, results, details)
    print(f"\nwritten to {path} ({len(results.rows)} results); TensorBoard: {output_dir / 'tensorboard'}")


def compare(paths: Sequence[str]) -> str:
    """The table that ``--compare`` prints for these results.json files."""
    if len(paths) < 2:
        raise ValueError("--compare needs at least two results.json files")
    return compare_table([load_results(p) for p in paths])


def cli(argv: Sequence[str] | None = None) -> None:
    """``--compare a.json b.json ...`` prints the comparison table; anything else is Hydra's command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--compare":
        with user_errors("herd.evaluate", (FileNotFoundError, ValueError), prefix="herd.evaluate --compare"):
            print(compare(argv[1:]))
        return
    main()


if __name__ == "__main__":
    cli()

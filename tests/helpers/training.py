"""Helpers for tests that run herd.train: compose the config the command line would, shrunk for tests."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

TRAIN_VOCAB = 512
PREFERENCE_SEQ_LEN = 512  # rows of the prepared_preferences fixture


def small_overrides(data_dir: Path | None) -> list[str]:
    """Command-line overrides that shrink a run to a 2-layer model and the test fixture's data
    (``data_dir``; None leaves the data config alone)."""
    data = [f"data.data_dir={data_dir}", "data.num_workers=0", "data.seq_len=64", "data.batch_size=8"]
    return [*(data if data_dir is not None else []), f"model.vocab_size={TRAIN_VOCAB}", "model.dim=64",
            "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "trainer.limit_val_batches=2",
            "trainer.enable_progress_bar=false", "callbacks.progress_bar=null", "trainer.enable_model_summary=false"]


def compose_train(tmp_path: Path, data_dir: Path | None, *overrides: str, run_dir: Path | None = None) -> DictConfig:
    """The ``train`` config as the command line would compose it, shrunk for tests and rooted in tmp_path
    (the run folder: ``run_dir``, default ``tmp_path/logs/run``)."""
    from herd.presets import config_dir

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[*small_overrides(data_dir), *overrides])
    with open_dict(cfg):
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.output_dir = str(run_dir or tmp_path / "logs" / "run")
        cfg.hydra.runtime.output_dir = cfg.paths.output_dir
    HydraConfig.instance().set_config(cfg)
    return cfg


# ------------------------------------------------------------------------- preference rows

IGNORE = -100


def response_tokens(content: list[int], header: tuple[int, ...] = (5, 6, 7), eot: int = 9):
    """A response as the chat format lays it out: header (formatting), content (trained on), eot (formatting).

    Returns (ids, content_mask)."""
    ids = [*header, *content, eot]
    return ids, [False] * len(header) + [True] * len(content) + [False]


def preference_batch(rows: list[list[tuple[list[int], list[tuple[list[int], list[bool], int]]]]], seq: int,
                     pad_id: int = 0):
    """A preference batch built by hand, independently of herd.data: each row is a list of groups
    ``(prompt_ids, [(response_ids, content_mask, rank), ...])`` laid out ``[prompt][response 1]...``
    and padded to ``seq``. Keys: tokens, document_ids, response_ids, ranks, targets (the next token
    where it is a content token of the same response, else -100)."""
    import torch

    out = {key: [] for key in ("tokens", "document_ids", "response_ids", "ranks", "targets")}
    for groups in rows:
        tokens, docs, responses, ranks, mask = [], [], [], [], []
        for doc, (prompt, group) in enumerate(groups):
            tokens += prompt
            docs += [doc] * len(prompt)
            responses += [0] * len(prompt)
            ranks += [-1] * len(prompt)
            mask += [False] * len(prompt)
            for k, (ids, content, rank) in enumerate(group, start=1):
                tokens += ids
                docs += [doc] * len(ids)
                responses += [k] * len(ids)
                ranks += [rank] * len(ids)
                mask += content
        pad = seq - len(tokens)
        assert pad >= 0, "the groups do not fit the row"
        tokens += [pad_id] * pad
        docs += [len(groups)] * pad
        responses += [0] * pad
        ranks += [-1] * pad
        mask += [False] * pad
        targets = [tokens[p + 1] if p + 1 < seq and mask[p + 1] and docs[p + 1] == docs[p]
                   and responses[p + 1] == responses[p] else IGNORE for p in range(seq)]
        for key, values in zip(out, (tokens, docs, responses, ranks, targets), strict=True):
            out[key].append(values)
    return {key: torch.tensor(values) for key, values in out.items()}


def save_random_model(folder: Path, tokenizer: Path, seed: int = 3) -> Path:
    """A random backbone of the tests' shape (dim 64, 2 layers, 512 ids), saved with ``tokenizer``: the
    start model of the adapter stages' runs."""
    import torch

    from herd.interop import hf
    from herd.model import ModelConfig, Transformer

    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=64,
                         tie_embeddings=True, rope_theta=500000.0)
    torch.manual_seed(seed)
    return hf.save(Transformer(config), folder, tokenizer=tokenizer)


def two_document_batch(vocab_size: int = 97):
    """A (2, 40) batch of random tokens in two documents (25 + 15 tokens), targets the next token of the
    same document: the last token of each document predicts nothing (-100)."""
    import torch

    tokens = torch.randint(0, vocab_size, (2, 40))
    document_ids = torch.cat([torch.zeros(2, 25, dtype=torch.long), torch.ones(2, 15, dtype=torch.long)], dim=1)
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, 24] = IGNORE  # the last token of a document predicts nothing
    targets[:, -1] = IGNORE
    return {"tokens": tokens, "document_ids": document_ids, "targets": targets}


def start_then_kill(command: list[str], env: dict[str, str], ready, timeout: float = 600) -> None:
    """Run ``command``, SIGKILL it (and the processes it started, such as a second rank) as soon as
    ``ready()`` is true, and check that it was still running then."""
    import os
    import signal
    import subprocess
    import time

    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + timeout
    while not ready() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"


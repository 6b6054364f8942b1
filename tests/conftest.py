"""Shared fixtures: tiny model configs and a deterministic seed for every test."""

from __future__ import annotations

import pytest
import torch

from herd.model import ModelConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def small_config() -> ModelConfig:
    """Two layers, GQA (4 query heads per KV head... 4/2), untied: fast and covers every code path."""
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=256)


# ----------------------------------------------------------------------------- training runs

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

from hydra import compose, initialize_config_dir  # noqa: E402

from helpers.training import PREFERENCE_SEQ_LEN, TRAIN_VOCAB  # noqa: E402

CORPUS_MODULES = ("argparse", "base64", "bisect", "calendar", "colorsys", "csv", "dataclasses", "difflib",
                  "enum", "fnmatch", "fractions", "functools", "getopt", "glob", "heapq", "hmac", "ipaddress",
                  "keyword", "linecache", "numbers", "operator", "pprint", "queue", "random", "sched", "shlex",
                  "statistics", "string", "textwrap", "timeit", "tokenize", "uuid", "warnings", "weakref")


@pytest.fixture(scope="session")
def prepared_corpus(tmp_path_factory) -> Path:
    """34 stdlib modules prepared as shards (BPE of 512 ids, rows of 64): real text that a model learns."""
    import sysconfig

    from herd.data.embedded.corpus import module_docstrings
    from herd.prepare import prepare
    from herd.presets import config_dir

    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (root / "code").mkdir()
    (root / "prose").mkdir()
    for name in CORPUS_MODULES:
        shutil.copy(stdlib / f"{name}.py", root / "code" / f"{name}.py")
        (root / "prose" / f"{name}.txt").write_text(module_docstrings((stdlib / f"{name}.py").read_text(), name))
    out = root / "prepared"
    sources = f"+sources={{prose: {{input: {root / 'prose'}}}, code: {{input: {root / 'code'}}}}}"
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("prepare", overrides=[
            f"output_dir={out}", "~sources", sources, "seq_len=64",
            "val_fraction=0.1", "num_proc=1", "progress=false", f"tokenizer.vocab_size={TRAIN_VOCAB}",
            "shards.max_rows=256", "shards.min_count=4"])
    prepare(cfg)
    return out





@pytest.fixture(scope="session")
def prepared_preferences(prepared_corpus, tmp_path_factory) -> Path:
    """Embedded preference rankings (one definition per stdlib module) with the corpus' tokenizer,
    in rows of PREFERENCE_SEQ_LEN tokens: data for stage=reward and stage=dpo."""
    from herd.prepare import prepare
    from herd.presets import config_dir

    out = tmp_path_factory.mktemp("preferences") / "prepared"
    sources = "+sources={preferences: {input: 'stdlib:preferences?max_per_module=1'}}"
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("prepare", overrides=[
            f"output_dir={out}", "~sources", sources, f"seq_len={PREFERENCE_SEQ_LEN}", "val_fraction=0.1",
            "num_proc=1", "progress=false", f"tokenizer.path={prepared_corpus / 'tokenizer'}",
            "shards.max_rows=64", "shards.min_count=2"])
    prepare(cfg)
    return out


def _prepare_embedded(tmp_path_factory, corpus: Path, name: str, source: str, seq_len: int) -> Path:
    """An embedded media set prepared as source ``name`` with the corpus' tokenizer (a quarter held out)."""
    from herd.prepare import prepare
    from herd.presets import config_dir

    out = tmp_path_factory.mktemp(name) / "prepared"
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("prepare", overrides=[
            f"output_dir={out}", "~sources", f"+sources={{{name}: {{input: '{source}'}}}}", f"seq_len={seq_len}",
            "val_fraction=0.25", "num_proc=1", "progress=false", f"tokenizer.path={corpus / 'tokenizer'}",
            "shards.max_rows=8", "shards.min_count=2"])
    prepare(cfg)
    return out


@pytest.fixture(scope="session")
def prepared_images(prepared_corpus, tmp_path_factory) -> Path:
    """48 embedded shape pictures with captions (kind: image), with the corpus' tokenizer: data for
    stage=vision_adapter."""
    return _prepare_embedded(tmp_path_factory, prepared_corpus, "shapes", "stdlib:shapes?count=48", 64)


@pytest.fixture(scope="session")
def prepared_speech(prepared_corpus, tmp_path_factory) -> Path:
    """64 embedded espeak-ng utterances with transcripts (kind: audio, source ``speech``; 49 train and 15
    val clips of about 1.3 s), with the corpus' tokenizer: data for stage=speech_adapter (needs espeak-ng)."""
    return _prepare_embedded(tmp_path_factory, prepared_corpus, "speech", "stdlib:speech?count=64", 96)

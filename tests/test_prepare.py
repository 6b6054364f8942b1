"""herd.prepare: end to end on a tiny corpus, determinism, existing tokenizers, bad inputs, the CLI."""

from __future__ import annotations

import io
import json
import random
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from herd.data.sources import iter_documents
from herd.data.tokenizer import Tokenizer
from herd.paths import repo_root
from herd.prepare import assign_split, prepare

WORDS = ["the", "a", "of", "to", "and", "in", "is", "it", "for", "value", "list", "return", "function", "class", "module", "import", "path", "file", "data"]


def _text(rng, words):
    return " ".join(rng.choice(WORDS) + rng.choice(["", ",", ".\n", "()"]) for _ in range(words))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of text files (one empty) and a jsonl file (one empty text) of ~80 documents."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    (root / "notes").mkdir()
    for i in range(30):
        (root / "notes" / f"{i:02d}.txt").write_text(_text(rng, rng.randint(5, 80)))
    (root / "notes" / "empty.txt").write_text("  \n")
    lines = [{"body": _text(rng, rng.randint(5, 80)), "id": i} for i in range(50)] + [{"body": ""}]
    (root / "code.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def _config(output_dir, corpus, *overrides):
    with initialize_config_dir(config_dir=str(repo_root() / "configs"), version_base="1.3"):
        return compose(
            "prepare",
            overrides=[
                f"output_dir={output_dir}",
                "~sources",
                f"+sources={{notes: {{input: {corpus / 'notes'}}}, code: {{input: {corpus / 'code.jsonl'}, text_field: body}}}}",
                "seq_len=16",
                "val_fraction=0.2",
                "num_proc=1",
                "progress=false",
                "tokenizer.vocab_size=560",
                "shards.max_rows=8",
                "shards.min_count=2",
                *overrides,
            ],
        )


def _rows(folder, split_entry):
    """Tokens and document ids of a split, in row order."""
    tokens, docs = [], []
    for shard in split_entry["shards"]:
        with tarfile.open(folder / shard["path"]) as tar:
            for member in tar.getmembers():
                array = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
                (tokens if member.name.endswith(".tokens.npy") else docs).append(array)
    return np.concatenate(tokens), np.concatenate(docs)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "prepared"
    return prepare(_config(out, corpus))


def test_every_document_is_packed_once_in_its_split(prepared, corpus):
    manifest = json.loads((prepared / "manifest.json").read_text())
    tokenizer = Tokenizer.load(prepared / "tokenizer")
    assert manifest["tokenizer"]["fingerprint"] == tokenizer.fingerprint
    assert manifest["tokenizer"]["vocab_size"] == tokenizer.vocab_size == 560
    assert manifest["row_len"] == 17
    for name, inputs, field in (("notes", corpus / "notes", "text"), ("code", corpus / "code.jsonl", "body")):
        source = manifest["sources"][name]
        docs = [d for d in iter_documents(str(inputs), text_field=field) if d.text.strip()]
        assert (source["documents"], source["empty_documents"]) == (len(docs), 1)
        for split in ("train", "val"):
            expected = [
                [tokenizer.bos_id, *tokenizer.encode(d.text), tokenizer.eos_id]
                for d in docs
                if assign_split(d.id, 0.2) == split
            ]
            tokens, ids = _rows(prepared, source["splits"][split])
            real = ids >= 0
            assert tokens[real].tolist() == [t for doc in expected for t in doc]
            assert len(np.unique(ids[real])) == len(expected) == source["splits"][split]["documents"]
            assert source["splits"][split]["padding_tokens"] == int((~real).sum()) < 17
        assert source["splits"]["val"]["documents"] > 0
        assert len(source["splits"]["train"]["shards"]) >= 2


def _files(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.slow
def test_rerunning_gives_byte_identical_output_with_any_process_count(prepared, corpus, tmp_path):
    again = prepare(_config(tmp_path / "again", corpus, "num_proc=2"))
    assert _files(again) == _files(prepared)


def test_an_existing_tokenizer_is_used_and_copied(prepared, corpus, tmp_path):
    out = prepare(_config(tmp_path / "reuse", corpus, f"tokenizer.path={prepared / 'tokenizer'}"))
    assert _files(out) == _files(prepared)  # same tokenizer: same shards, same manifest


def test_a_malformed_jsonl_line_names_file_and_line(corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    cfg = _config(tmp_path / "out", corpus, f"sources.code.input={bad}", "sources.code.text_field=text")
    with pytest.raises(ValueError, match=f"{bad}:2: malformed JSON"):
        prepare(cfg)


def test_a_missing_input_names_itself(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.jsonl")):
        prepare(_config(tmp_path / "out", corpus, f"sources.code.input={tmp_path / 'nope.jsonl'}"))


def test_the_command_line_entry_point(corpus, tmp_path):
    out = tmp_path / "cli"
    command = [
        sys.executable, "-m", "herd.prepare", f"output_dir={out}",
        "~sources", f"+sources={{t: {{input: {corpus / 'notes'}}}}}", "seq_len=16", "tokenizer.vocab_size=540",
        "num_proc=1", f"hydra.run.dir={tmp_path / 'logs'}",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["sources"]) == ["t"] and manifest["tokenizer"]["vocab_size"] == 540


@pytest.mark.slow
def test_the_default_embedded_corpus(tmp_path):
    with initialize_config_dir(config_dir=str(repo_root() / "configs"), version_base="1.3"):
        cfg = compose("prepare", overrides=[f"output_dir={tmp_path / 'stdlib'}", "progress=false"])
    started = time.perf_counter()
    out = prepare(cfg)
    assert time.perf_counter() - started < 120
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 8192 and manifest["seq_len"] == 512
    for name in ("prose", "code"):
        source = manifest["sources"][name]
        assert source["tokens"] > 300_000 and source["splits"]["val"]["documents"] > 0
        assert len(source["splits"]["train"]["shards"]) >= 8
    assert manifest["sources"]["prose"]["empty_documents"] > 0  # modules without docstrings

"""herd.prepare: end to end on a tiny corpus, determinism, existing tokenizers, bad inputs, failed runs, the CLI."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from herd.data.inputs import BadInputError
from herd.data.kinds.text import iter_documents
from herd.data.tokenizer import Tokenizer, train_tokenizer
from herd.paths import repo_root
from herd.prepare import PrepareError, assign_split, prepare

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
        assert source["kind"] == "text"
        assert source["layout"] == {"members": ["tokens", "document_ids"], "packing": "stream"}
        with tarfile.open(prepared / source["splits"]["train"]["shards"][0]["path"]) as tar:
            assert {m.name.split(".", 1)[1] for m in tar.getmembers()} == {"tokens.npy", "document_ids.npy"}


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


# --- bad inputs, failed runs, the command line's errors -----------------------------------------


def _with_bad_inputs(corpus, root):
    """The corpus, plus binary files in the folder and bad lines at the end of the jsonl file."""
    shutil.copytree(corpus / "notes", root / "notes")
    (root / "notes" / "zz-nul.txt").write_bytes(b"\0" * 4096)  # valid UTF-8, but not text
    (root / "notes" / "zz-controls.txt").write_text("ok \x01\x02\x03\x1b words " * 50)
    (root / "notes" / "zz-latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    bad_lines = [
        '{"body": oops}',  # malformed_json
        '["body"]',  # not_an_object
        '{"text": "wrong field"}',  # missing_field
        '{"body": 7}',  # not_a_string
        '{"body": "nul \\u0000 inside"}',  # binary
    ]
    good = (corpus / "code.jsonl").read_bytes()
    (root / "code.jsonl").write_bytes(good + "\n".join(bad_lines).encode() + b'\n{"body": "\xff"}\n')
    return root


def _bad_config(output_dir, root, *overrides):
    return _config(output_dir, root, f"sources.notes.input={root / 'notes'}",
                   f"sources.code.input={root / 'code.jsonl'}", *overrides)  # fmt: skip


def test_a_nul_file_is_refused_by_default_and_nothing_is_written(corpus, tmp_path):
    root = _with_bad_inputs(corpus, tmp_path / "in")
    for other in ("zz-controls.txt", "zz-latin1.txt"):
        (root / "notes" / other).unlink()
    nul = root / "notes" / "zz-nul.txt"
    out = tmp_path / "new" / "prepared"
    expected = f"{nul}: the file is not text \\(it holds NUL characters\\);.* set on_bad_input=skip"
    with pytest.raises(BadInputError, match=expected):  # found while training the tokenizer
        prepare(_bad_config(out, root))
    assert not (tmp_path / "new").exists()  # neither the output folder nor its parent was left
    with pytest.raises(BadInputError, match=expected):  # found while tokenizing
        prepare(_bad_config(out, root, f"tokenizer.path={_prepared_tokenizer(corpus, tmp_path)}"))
    assert not (tmp_path / "new").exists()


def test_a_bad_jsonl_line_is_refused_with_file_and_line(corpus, tmp_path):
    root = _with_bad_inputs(corpus, tmp_path / "in")
    shutil.rmtree(root / "notes")
    shutil.copytree(corpus / "notes", root / "notes")
    with pytest.raises(BadInputError, match=f"{root / 'code.jsonl'}:52: malformed JSON") as caught:
        prepare(_bad_config(tmp_path / "out", root))
    assert caught.value.reason == "malformed_json"


def test_bad_inputs_are_skipped_and_counted_once(corpus, prepared, tmp_path):
    root = _with_bad_inputs(corpus, tmp_path / "in")
    out = prepare(_bad_config(tmp_path / "out", root, "on_bad_input=skip"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"]["notes"]["skipped"] == {"binary": 2, "not_utf8": 1}
    assert manifest["sources"]["code"]["skipped"] == {
        "binary": 1, "malformed_json": 1, "missing_field": 1, "not_a_string": 1, "not_an_object": 1, "not_utf8": 1,
    }  # fmt: skip
    # what is left is exactly the clean corpus: the same tokenizer, shards and counts
    clean = json.loads((prepared / "manifest.json").read_text())
    assert {k: v for k, v in _files(out).items() if k != "manifest.json"} == {
        k: v for k, v in _files(prepared).items() if k != "manifest.json"
    }
    for name in ("notes", "code"):
        assert clean["sources"][name]["skipped"] == {}
        for key in ("documents", "empty_documents", "tokens", "splits"):
            assert manifest["sources"][name][key] == clean["sources"][name][key]


def test_a_source_whose_every_input_is_bad_is_refused(corpus, tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "a.dat").write_bytes(b"\0\1\2" * 100)
    cfg = _config(tmp_path / "out", corpus, f"sources.notes.input={tmp_path / 'bin'}", "on_bad_input=skip",
                  f"tokenizer.path={_prepared_tokenizer(corpus, tmp_path)}")  # fmt: skip
    with pytest.raises(PrepareError, match=r"source notes: every input was skipped as bad \(binary: 1\)"):
        prepare(cfg)
    assert not (tmp_path / "out").exists()


def _prepared_tokenizer(corpus, tmp_path):
    folder = tmp_path / "tokenizer"
    train_tokenizer([d.text for d in iter_documents(str(corpus / "notes"))], 560).save(folder)
    return folder


def test_a_failed_run_leaves_an_existing_output_as_it_was(corpus, prepared, tmp_path):
    out = tmp_path / "existing"
    shutil.copytree(prepared, out)
    (out / "README.md").write_text("mine")
    (out / "notes" / "keep.txt").write_text("mine too")
    before = _files(out)
    root = _with_bad_inputs(corpus, tmp_path / "in")
    with pytest.raises(BadInputError):
        prepare(_bad_config(out, root, f"tokenizer.path={prepared / 'tokenizer'}"))
    assert _files(out) == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_a_failure_while_moving_the_output_into_place_is_undone(corpus, prepared, tmp_path, monkeypatch):
    out = tmp_path / "existing"
    shutil.copytree(prepared, out)
    (out / "notes" / "train-000099.tar").write_bytes(b"an old shard")
    before = _files(out)
    replace, failed = os.replace, []

    def failing_replace(source, target):
        if Path(target) == out / "manifest.json" and not failed:  # the last move of the new output
            failed.append(source)
            raise OSError("disk full")
        replace(source, target)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        prepare(_config(out, corpus, "val_fraction=0.3"))
    monkeypatch.undo()
    assert _files(out) == before
    assert sorted(p.name for p in out.iterdir()) == ["code", "manifest.json", "notes", "tokenizer"]


def test_a_rerun_replaces_only_what_prepare_owns(corpus, prepared, tmp_path):
    out = tmp_path / "existing"
    shutil.copytree(prepared, out)
    (out / "notes" / "train-000099.tar").write_bytes(b"an old shard")  # replaced: prepare's
    (out / "notes" / "keep.txt").write_text("mine")
    (out / "old-source").mkdir()
    (out / "old-source" / "train-000000.tar").write_bytes(b"another run's source")
    (out / "tokenizer" / "extra.json").write_text("{}")  # the tokenizer folder is prepare's
    prepare(_config(out, corpus))
    files = _files(out)
    assert files.pop("notes/keep.txt") == b"mine"
    assert files.pop("old-source/train-000000.tar") == b"another run's source"
    assert files == _files(prepared)


def test_config_values_are_checked_first(corpus, tmp_path):
    for override, message in (
        ("on_bad_input=ignore", "on_bad_input must be one of \\('error', 'skip'\\), got 'ignore'"),
        ("shards.max_rows=lots", "shards.max_rows must be a positive integer, got 'lots'"),
        ("val_fraction=1.5", "val_fraction must be a number in \\[0, 1\\), got 1.5"),
        ("tokenizer.vocab_size=0", "tokenizer.vocab_size must be a positive integer, got 0"),
    ):
        with pytest.raises(PrepareError, match=message):
            prepare(_config(tmp_path / "out", corpus, override))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "is not valid JSON"), ('{"version": "1.0"}', "is not a tokenizer herd can use")],
)
def test_a_bad_tokenizer_file_is_named(corpus, tmp_path, content, message):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(content)
    with pytest.raises(PrepareError, match=f"tokenizer.path: {tmp_path / 'tok' / 'tokenizer.json'} {message}"):
        prepare(_config(tmp_path / "out", corpus, f"tokenizer.path={tmp_path / 'tok'}"))


def test_the_command_line_reports_user_errors_in_one_line(corpus, tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{not json")
    root = _with_bad_inputs(corpus, tmp_path / "in")
    base = [sys.executable, "-m", "herd.prepare", f"output_dir={tmp_path / 'out'}", "num_proc=1",
            "progress=false", f"hydra.run.dir={tmp_path / 'logs'}", "~sources"]  # fmt: skip
    for overrides, named in (
        ([f"+sources={{t: {{input: {corpus / 'notes'}}}}}", f"tokenizer.path={tmp_path / 'tok'}"],
         f"{tmp_path / 'tok' / 'tokenizer.json'} is not valid JSON"),
        ([f"+sources={{t: {{input: {root / 'notes' / 'zz-nul.txt'}}}}}", "tokenizer.vocab_size=540"],
         f"{root / 'notes' / 'zz-nul.txt'}: the file is not text"),
    ):  # fmt: skip
        result = subprocess.run(base + overrides, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("herd: ") and named in result.stderr
        assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


def test_the_command_line_reports_a_bad_dialog_option_in_one_line(corpus, tmp_path):
    dialogs = tmp_path / "chat.jsonl"
    dialogs.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    command = [sys.executable, "-m", "herd.prepare", f"output_dir={tmp_path / 'out'}", "num_proc=1", "progress=false",
               f"hydra.run.dir={tmp_path / 'logs'}", "~sources",
               f"+sources={{chat: {{input: {dialogs}, kind: dialog, too_long: wrap}}}}"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("herd: sources.chat.too_long must be one of ('drop', 'truncate'), got 'wrap'")
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()

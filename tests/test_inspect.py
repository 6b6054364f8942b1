"""python -m herd.inspect: one prepared row with its trained tokens marked, plain when piped, coloured in a terminal."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from rich.console import Console

from herd.inspect import InspectError, load_row, render_plain, show_row, tokenizer_of
from herd.paths import repo_root
from herd.prepare import prepare

DIALOGS = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]},
    {"prompt": "Name a colour.", "completion": "Blue."},
]
FIRST = (
    "<<doc 1>><|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n[[4<|eot_id|>]]"
)
SECOND = (
    "<<doc 2>><|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n[[Blue.<|eot_id|>]]"
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A dialog source (two short dialogs in one row) and a text source, byte-level tokenizer."""
    root = tmp_path_factory.mktemp("inspect")
    (root / "chat.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DIALOGS))
    (root / "notes").mkdir()
    (root / "notes" / "a.txt").write_text("Plain text is trained on everywhere.")
    cfg = OmegaConf.load(repo_root() / "configs" / "prepare.yaml")
    cfg.pop("hydra")
    cfg.merge_with(
        {
            "output_dir": str(root / "prepared"),
            "seq_len": 127,
            "val_fraction": 0.0,
            "num_proc": 1,
            "progress": False,
            "tokenizer": {"vocab_size": 512},  # 256 byte tokens: one token per byte
            "shards": {"max_rows": 8, "min_count": 1},
        }
    )
    cfg.sources = {"chat": {"input": str(root / "chat.jsonl"), "kind": "dialog"}, "notes": {"input": str(root / "notes")}}
    return prepare(cfg)


def _run(*overrides, cwd):
    command = [sys.executable, "-m", "herd.inspect", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_plain_output_brackets_the_trained_tokens(prepared, tmp_path):
    result = _run(f"data_dir={prepared}", "source=chat", "split=train", "row=0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    body, legend, counts = result.stdout.rstrip("\n").rsplit("\n", 2)
    padding = 128 - 37 - 43  # one token per byte and per special token: dialogs of 37 and 43 tokens
    assert body == FIRST + SECOND + f"<<padding: {padding} tokens>>\n"
    assert legend.startswith("legend: [[...]] trained on")
    trained = len("4") + 1 + len("Blue.") + 1  # the answers and their <|eot_id|>
    assert counts == (
        f"row 0 of chat/train (dialog, chat/train-000000.tar): 128 tokens, {trained} trained, 2 documents, "
        f"{padding} padding"
    )
    assert "\x1b[" not in result.stdout  # no colour codes in a pipe
    assert list(tmp_path.iterdir()) == []  # inspecting writes no files


def test_text_rows_train_on_every_token_after_the_first(prepared, tmp_path):
    view = load_row(str(prepared), "notes", "train", 0)
    text = render_plain(view, tokenizer_of(str(prepared)))
    assert text.startswith("<<doc 1>><|begin_of_text|>[[Plain text is trained on everywhere.<|end_of_text|>]]<<padding")


def test_the_terminal_output_is_coloured(prepared):
    view = load_row(str(prepared), "chat", "train", 0)
    tokenizer = tokenizer_of(str(prepared))
    out = io.StringIO()
    show_row(view, tokenizer, Console(file=out, force_terminal=True, color_system="standard", width=300))
    coloured = out.getvalue()
    assert "\x1b[32m4<|eot_id|>" in coloured and "\x1b[32mBlue.<|eot_id|>" in coloured  # trained: green
    assert "\x1b[2m" in coloured  # the rest: dim
    assert "[[" not in coloured and "legend: " in coloured and "8 trained, 2 documents" in coloured
    forced = io.StringIO()
    show_row(view, tokenizer, file=forced, force_terminal=True)
    assert "\x1b[" in forced.getvalue()
    piped = io.StringIO()
    show_row(view, tokenizer, file=piped)  # a StringIO is not a terminal: plain text
    assert piped.getvalue() == render_plain(view, tokenizer) + "\n"


def test_user_errors_are_one_line_with_status_2(prepared, tmp_path):
    for overrides, message in (
        (["source=nope"], "herd.inspect: source 'nope' is not in"),
        (["source=chat", "row=5"], "herd.inspect: row 5 is out of range: chat/train has rows 0..0"),
        (["source=chat", "split=test"], "herd.inspect: split must be one of ('train', 'val'), got 'test'"),
    ):
        result = _run(f"data_dir={prepared}", *overrides, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith(message) and "Traceback" not in result.stderr + result.stdout
    result = _run(f"data_dir={tmp_path / 'nothing'}", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("herd.inspect: manifest not found")
    with pytest.raises(InspectError, match="has no rows"):
        load_row(str(prepared), "chat", "val", 0)

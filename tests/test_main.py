"""The ``herd`` command (herd/__main__.py): its help lists every entry point, a command's help shows its
commented keys without importing torch, an unknown command exits 2, Hydra's help stays reachable.
A ``herd train debug=fast`` run is in tests/train/test_command.py."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def herd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "herd", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def entry_points() -> set[str]:
    """Modules of src/herd with a main block, found by reading their text (not as herd.__main__ does)."""
    guard = re.compile(r"""^if __name__ == ["']__main__["']:""", flags=re.MULTILINE)
    return {p.stem for p in (ROOT / "src" / "herd").glob("*.py")
            if not p.stem.startswith("_") and guard.search(p.read_text())}


def test_herd_help_lists_every_entry_point_with_one_line():
    found = entry_points()
    assert {"train", "prepare", "pipeline", "scaling", "inspect"} <= found and len(found) >= 13
    lines = herd("--help").stdout.splitlines()
    listed = {}
    for line in lines[lines.index("commands:") + 1:]:
        match = re.match(r"^  (\w+) +(\S.*)$", line)
        if match:
            listed[match.group(1)] = match.group(2)
    assert set(listed) == found
    assert listed["train"].startswith("Train one stage")
    assert listed["prepare"].startswith("Raw text, dialogs")  # the docstring's "herd.prepare:" is dropped
    assert herd().stdout.splitlines() == lines  # no arguments: the same overview


def test_a_commands_help_shows_its_keys_with_comments_and_imports_no_torch():
    code = ("import sys; from herd.__main__ import main; main(['train', '--help', 'stage=sft']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    train_yaml = (ROOT / "configs" / "train.yaml").read_text()
    assert "  # Validate once before training (logs the starting val/loss at step 0).\n  validate_first: true" in text
    assert all(("  " + line).rstrip() in text for line in train_yaml.splitlines())  # the whole file, comments too
    groups = text[text.index("config groups"):text.index("keys of train")]
    stages = sorted(p.stem for p in (ROOT / "configs" / "stage").glob("*.yaml"))
    for stage in stages:
        assert re.search(rf"^   [ *]{stage} ", groups, flags=re.MULTILINE), stage
    assert re.search(r"^   \*sft +Supervised fine-tuning", groups, flags=re.MULTILINE)  # the option given
    assert re.search(r"^   \*tiny +A few-million-parameter", groups, flags=re.MULTILINE)  # a default
    sft = text[text.index("keys of stage=sft"):]
    assert "init_from: null          # required: the model to fine-tune" in sft
    scoring = herd("score", "--help").stdout  # a command without groups
    assert "config groups" not in scoring and "model_dir" in scoring


def test_an_unknown_command_is_one_line_and_exit_status_2():
    result = herd("trian", "debug=fast", check=False)
    assert result.returncode == 2 and result.stdout == ""
    line, = result.stderr.strip().splitlines()
    assert line.startswith("herd: unknown command 'trian' (did you mean train?); the commands are: ")
    assert set(line.split("the commands are: ")[1].split(", ")) == entry_points()


@pytest.mark.slow
def test_hydras_help_and_a_command_without_a_config_pass_through():
    assert herd("train", "--hydra-help").stdout.startswith("Hydra (")
    assert "usage: python -m herd.scaling" in herd("scaling", "--help").stdout  # its own argparse help


def test_the_console_script_is_herd_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["herd"].partition(":")
    assert module == "herd.__main__" and function == "main"
    from herd import __main__ as dispatcher

    assert callable(dispatcher.main)
    assert {"herd-train", "herd-prepare", "herd-curate"} <= set(scripts)  # the old scripts stay

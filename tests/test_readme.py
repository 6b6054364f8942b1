"""Every ```python block of README.md and of every page under docs/ runs as written.

Each block runs in a fresh process of this Python, with a temporary folder as its working
directory, so nothing it writes lands in the repository; a failure names the page and the line.
A block that cannot run on a developer's machine (it needs a cluster, a run folder, files that do
not exist yet) is skipped only by a marker on the line right before its opening fence, with the
reason in parentheses:

    <!-- readme-test: skip (needs the run folder that make train writes) -->

A marker without a reason, a marker that is not right before a python block, and a malformed
``readme-test`` comment fail the marker test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The pages whose blocks run: the README and the documentation site's pages.
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
PYTHON_LANGUAGES = ("python", "py")
_FENCE = re.compile(r"^```\s*(?P<language>[\w+-]*)\s*$")
_MARKER = re.compile(r"^<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]*)\)\s*-->\s*$")
_MENTION = re.compile(r"readme.test", re.IGNORECASE)
BLOCK_TIMEOUT_S = 300


@dataclass(frozen=True)
class Block:
    """One fenced code block: the page line of its opening fence, its language and code, its page."""

    line: int
    language: str
    code: str
    skip_reason: str | None = None
    page: str = "README.md"


def parse_readme(text: str, page: str = "README.md") -> tuple[list[Block], list[str]]:
    """The python blocks of a page (README.md or one under docs/) and the problems with its
    ``readme-test`` markers, each naming ``page`` and the line."""
    blocks: list[Block] = []
    problems: list[str] = []
    lines = text.splitlines()
    pending: tuple[int, str] | None = None  # (line, reason) of a marker waiting for its block
    index = 0
    while index < len(lines):
        number, line = index + 1, lines[index].strip()
        fence = _FENCE.match(line)
        if fence:
            language = fence.group("language")
            end = index + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            if end == len(lines):
                problems.append(f"{page} line {number}: the code block is never closed")
            is_python = language in PYTHON_LANGUAGES
            if pending is not None and not is_python:
                problems.append(f"{page} line {pending[0]}: the readme-test marker is before a "
                                f"{language or 'plain'} block, not a python one")
            if is_python:
                reason = pending[1] if pending is not None else None
                blocks.append(Block(number, language, "\n".join(lines[index + 1:end]) + "\n", reason, page))
            pending = None
            index = end + 1
            continue
        if pending is not None:
            problems.append(f"{page} line {pending[0]}: a readme-test marker must be the line right "
                            "before a ```python fence")
            pending = None
        if line.startswith("<!--") and _MENTION.search(line):  # prose may mention markers
            marker = _MARKER.match(line)
            if marker is None:
                problems.append(f"{page} line {number}: a readme-test marker is written "
                                f"'<!-- readme-test: skip (reason) -->', not {line!r}")
            elif not marker.group("reason").strip():
                problems.append(f"{page} line {number}: the skip marker gives no reason; write why "
                                "the block cannot run, e.g. '<!-- readme-test: skip (needs a cluster) -->'")
            else:
                pending = (number, marker.group("reason").strip())
        index += 1
    if pending is not None:
        problems.append(f"{page} line {pending[0]}: the readme-test marker is before no code block")
    return blocks, problems


def _parse_pages() -> tuple[list[Block], list[str]]:
    blocks: list[Block] = []
    problems: list[str] = []
    for path in PAGES:
        page = path.relative_to(ROOT).as_posix()
        page_blocks, page_problems = parse_readme(path.read_text(encoding="utf-8"), page)
        blocks += page_blocks
        problems += page_problems
    return blocks, problems


BLOCKS, PROBLEMS = _parse_pages()


def test_readme_markers_are_well_formed():
    assert PROBLEMS == [], "\n".join(PROBLEMS)


def test_most_python_blocks_of_the_readme_run():
    runnable = [block for block in BLOCKS if block.skip_reason is None]
    assert len(runnable) >= 2 and len(runnable) > len(BLOCKS) - len(runnable), [
        f"{b.page}:{b.line}" for b in BLOCKS]


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{block.page}:line{block.line}" for block in BLOCKS])
def test_readme_python_block_runs(block: Block, tmp_path):
    if block.skip_reason is not None:
        pytest.skip(f"{block.page} line {block.line}: {block.skip_reason}")
    # Blank lines in front make the traceback's line numbers the page's own.
    script = tmp_path / f"{re.sub(r'[^A-Za-z0-9]', '_', block.page)}_line{block.line}.py"
    script.write_text("\n" * block.line + block.code, encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=BLOCK_TIMEOUT_S, check=False,
    )
    assert result.returncode == 0, (
        f"the ```python block at {block.page} line {block.line} failed (exit {result.returncode}; line "
        f"numbers in the traceback are {block.page}'s):\n{result.stderr[-4000:]}"
    )


# ------------------------------------------------------------------------------ the parser


def test_parser_reads_blocks_reasons_and_line_numbers():
    text = "\n".join([
        "# title",
        "```bash",
        "make train",
        "```",
        "<!-- readme-test: skip (needs a cluster) -->",
        "```python",
        "import torch",
        "```",
        "",
        "```python",
        "print(1)",
        "```",
        "```",
        "plain output",
        "```",
    ])
    blocks, problems = parse_readme(text)
    assert problems == []
    assert [(b.line, b.code, b.skip_reason) for b in blocks] == [
        (6, "import torch\n", "needs a cluster"), (10, "print(1)\n", None)]


@pytest.mark.parametrize("marker, expected", [
    ("<!-- readme-test: skip () -->", "gives no reason"),
    ("<!-- readme-test: skip (  ) -->", "gives no reason"),
    ("<!-- readme-test: skip -->", "is written"),
    ("<!-- readme_test: skp (typo) -->", "is written"),
], ids=["empty", "blank", "no-parentheses", "misspelt"])
def test_parser_refuses_a_marker_without_a_reason(marker, expected):
    blocks, problems = parse_readme(f"text\n{marker}\n```python\nprint(1)\n```\n")
    assert len(problems) == 1 and "README.md line 2" in problems[0] and expected in problems[0]
    assert [b.skip_reason for b in blocks] == [None]  # a bad marker skips nothing


@pytest.mark.parametrize("text, expected", [
    ("<!-- readme-test: skip (why) -->\n\n```python\nx = 1\n```\n", "right before"),
    ("<!-- readme-test: skip (why) -->\n```bash\nls\n```\n", "not a python one"),
    ("text\n<!-- readme-test: skip (why) -->\n", "before no code block"),
    ("```python\nx = 1\n", "never closed"),
], ids=["blank-line-between", "before-bash", "before-nothing", "unclosed"])
def test_parser_refuses_a_marker_away_from_its_block(text, expected):
    _, problems = parse_readme(text)
    assert len(problems) == 1 and expected in problems[0], problems


def test_parser_names_the_page_of_a_block_and_a_problem():
    blocks, problems = parse_readme("```python\nx = 1\n```\n<!-- readme-test: skip () -->\n```python\ny\n```\n",
                                    "docs/page.md")
    assert [(b.page, b.line) for b in blocks] == [("docs/page.md", 1), ("docs/page.md", 5)]
    assert len(problems) == 1 and problems[0].startswith("docs/page.md line 4: ")


def test_every_docs_page_is_read():
    pages = {block.page for block in BLOCKS}
    assert "docs/backbone.md" in pages and all(page == "README.md" or page.startswith("docs/") for page in pages)
    assert len(PAGES) > 2 and all(path.suffix == ".md" for path in PAGES)

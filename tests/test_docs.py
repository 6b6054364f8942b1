"""The documentation keeps up with the project: configs, commands, stages, make targets, paths, links.

- Every option of a config group (``configs/<group>/<option>.yaml``) has a row in a table of
  docs/configuration.md whose first cell is ``group=option`` (``group@package=option`` for the
  groups chosen inside a stage), and every such row names an option that exists.
- Every command (``src/herd/<command>.py`` with a ``main`` run under ``__main__``) has a docs page
  that shows ``python -m herd.<command>`` and a row in the command tables of README.md and
  docs/index.md; every stage and make target has a row in README.md (and the make targets in
  docs/development.md).
- The files and tests the pages name exist, and README.md's links lead to existing pages and anchors.
- The site builds with ``mkdocs build --strict`` (a broken link or anchor, or a page missing from the
  navigation, fails it).

The python blocks of the pages run in tests/test_readme.py.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIGS = ROOT / "configs"
CONFIG_PAGE = DOCS / "configuration.md"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]

_FENCE = re.compile(r"^\s*```")
_OPTION_CELL = re.compile(r"`(?P<group>[\w-]+)(?:@[\w.]+)?=(?P<option>[\w-]+)`")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _table_rows(text: str) -> list[tuple[int, list[str]]]:
    """(line, cells) of every markdown table row outside fenced code; the separator rows left out."""
    rows, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        stripped = line.strip()
        if fenced or not stripped.startswith("|") or re.fullmatch(r"\|[\s|:-]*", stripped):
            continue
        rows.append((number, [cell.strip() for cell in stripped.strip("|").split("|")]))
    return rows


def _first_cells(path: Path) -> list[tuple[int, str]]:
    return [(number, cells[0]) for number, cells in _table_rows(_text(path))]


# ------------------------------------------------------------------------------ config groups


def config_options() -> dict[tuple[str, str], Path]:
    """(group, option) -> its yaml, for every option of every group folder of configs/ (a group's
    subfolders, such as stage/shared, hold pieces its options include, not options)."""
    return {(path.parent.name, path.stem): path
            for group in sorted(p for p in CONFIGS.iterdir() if p.is_dir())
            for path in sorted(group.glob("*.yaml"))}


def documented_options(path: Path = CONFIG_PAGE) -> dict[tuple[str, str], int]:
    """(group, option) -> line, for every table row of ``path`` whose first cell is ``group=option``."""
    found = {}
    for number, cell in _first_cells(path):
        match = _OPTION_CELL.fullmatch(cell)
        if match:
            found[(match["group"], match["option"])] = number
    return found


def test_every_config_option_has_a_row_in_the_config_groups_page():
    documented = documented_options()
    missing = [f"configs/{group}/{option}.yaml: docs/configuration.md has no table row for `{group}={option}`; "
               f"add one to its {group} table: | `{group}={option}` | what it chooses | [page](page.md) |"
               for group, option in config_options() if (group, option) not in documented]
    assert not missing, "\n".join(missing)


def test_every_row_of_the_config_groups_page_names_an_existing_option():
    options = config_options()
    groups = {group for group, _ in options}
    stale = [f"docs/configuration.md line {line}: `{group}={option}` names no config "
             f"(configs/{group}/{option}.yaml does not exist)"
             for (group, option), line in documented_options().items()
             if group in groups and (group, option) not in options]
    assert not stale, "\n".join(stale)


def test_the_config_check_sees_every_group_and_a_removed_row(tmp_path):
    """The check reads each group's options, and a page without one of them fails it."""
    groups = {group for group, _ in config_options()}
    assert {"model", "data", "stage", "experiment", "strategy", "trainer", "logger", "callbacks",
            "debug", "pipeline", "vision", "speech"} <= groups
    assert ("stage", "shared") not in config_options()
    page = tmp_path / "configuration.md"
    page.write_text("\n".join(line for line in _text(CONFIG_PAGE).splitlines()
                              if not line.startswith("| `stage=sft` |")), encoding="utf-8")
    assert ("stage", "sft") in documented_options() and ("stage", "sft") not in documented_options(page)


# ------------------------------------------------------------------------------ commands, stages, make targets


def entry_points() -> list[str]:
    """The commands: modules of src/herd with a ``main`` function run under ``if __name__ == "__main__"``
    (``__main__.py`` and other private modules left out: ``python -m herd`` is not a ``herd.<command>``)."""
    commands = []
    for path in sorted((ROOT / "src" / "herd").glob("[!_]*.py")):
        tree = ast.parse(_text(path))
        has_main = any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body)
        runs_main = any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)
        if has_main and runs_main:
            commands.append(path.stem)
    return commands


def _command_pattern(command: str) -> re.Pattern[str]:
    return re.compile(rf"python -m herd\.{command}(?![\w.])")


def test_the_commands_are_found():
    assert {"train", "prepare", "evaluate", "pipeline", "scaling", "inspect"} <= set(entry_points())
    assert "presets" not in entry_points()  # a library module, no command


@pytest.mark.parametrize("command", entry_points())
def test_every_command_has_a_docs_page(command):
    pattern = _command_pattern(command)
    pages = [path.name for path in sorted(DOCS.rglob("*.md"))
             if path.name != "index.md" and pattern.search(_text(path))]
    assert pages, (f"src/herd/{command}.py is a command, but no page of docs/ (besides index.md) shows "
                   f"`python -m herd.{command}`: document it on the page of its topic")
    for table_page in (README, DOCS / "index.md"):
        rows = [cells[0] for _, cells in _table_rows(_text(table_page))]
        assert any(pattern.search(cell) for cell in rows), (
            f"{table_page.relative_to(ROOT)}: the command table has no row for `python -m herd.{command}`")


def stages() -> list[str]:
    return sorted(path.stem for path in (CONFIGS / "stage").glob("*.yaml"))


def make_targets() -> list[str]:
    """The targets of the Makefile's .PHONY line (continued over backslashed lines)."""
    text = _text(ROOT / "Makefile").replace("\\\n", " ")
    phony = re.search(r"^\.PHONY:(.*)$", text, re.MULTILINE)
    assert phony, "the Makefile has no .PHONY line"
    return phony.group(1).split()


def test_every_stage_has_a_row_in_the_readme():
    cells = {cells[0] for _, cells in _table_rows(_text(README))}
    missing = [stage for stage in stages() if f"`{stage}`" not in cells]
    assert not missing, f"README.md's stage table has no row for: {missing}"


def test_every_make_target_has_a_row_in_the_readme_and_the_development_page():
    assert {"train", "test", "docs"} <= set(make_targets())
    for page in (README, DOCS / "development.md"):
        cells = " ".join(cells[0] for _, cells in _table_rows(_text(page)))
        missing = [target for target in make_targets() if f"`make {target}`" not in cells]
        assert not missing, f"{page.relative_to(ROOT)}: no make-target table row for {missing}"


# ------------------------------------------------------------------------------ paths, tests and links


_REPO_PATH = re.compile(r"(?<![\w/.~-])((?:src|tests|configs|bench|scripts|docs)/[\w./-]*[\w/])(?:::(\w+))?")


@pytest.mark.parametrize("page", PAGES, ids=[path.relative_to(ROOT).as_posix() for path in PAGES])
def test_the_files_and_tests_a_page_names_exist(page):
    problems = []
    for number, line in enumerate(_text(page).splitlines(), 1):
        for match in _REPO_PATH.finditer(line):
            path, test = ROOT / match[1], match[2]
            if not path.exists():
                problems.append(f"line {number}: {match[1]} does not exist")
            elif test and not re.search(rf"^\s*def {test}\(", _text(path), re.MULTILINE):
                problems.append(f"line {number}: {match[1]} has no test {test}")
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


def _anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, made as the site (and GitHub) make them."""
    from pymdownx.slugs import slugify

    slug, anchors, fenced = slugify(case="lower"), set(), False
    for line in _text(page).splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            anchors.add(slug(re.sub(r"[`*]", "", heading[1]).replace("\\", ""), "-"))
    return anchors


def test_the_readme_links_lead_to_existing_pages_and_anchors():
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _text(README)):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        file, _, anchor = target.partition("#")
        path = ROOT / file
        if not path.exists():
            problems.append(f"{target}: {file} does not exist")
        elif anchor and anchor not in _anchors(path):
            problems.append(f"{target}: {file} has no heading with the anchor #{anchor}")
    assert not problems, "README.md:\n" + "\n".join(problems)


def test_the_anchor_reader_makes_the_sites_anchors():
    assert "data-curation-python--m-herdcurate" in _anchors(DOCS / "data.md")
    assert "quick-start" in _anchors(DOCS / "index.md")


# ------------------------------------------------------------------------------ the site


def test_the_site_builds_with_broken_links_failing(tmp_path):
    """``mkdocs build --strict`` (what ``make docs`` runs): every warning, such as a link to a missing
    page or anchor or a page left out of the navigation, fails the build."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-3000:]}{result.stderr[-6000:]}"
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "configuration.html").is_file()

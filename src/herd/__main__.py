"""The ``herd`` command: one subcommand per entry point, with the same Hydra overrides.

    herd --help                      # the commands, one line each
    herd train debug=fast            # exactly python -m herd.train debug=fast
    herd train --help                # configs/train.yaml with its comments, and the config groups' options
    herd train --hydra-help          # Hydra's own flags (herd train --cfg job prints the composed config)
    python -m herd train ...         # the same without the console script

``herd <cmd> ARGS`` runs the module ``herd.<cmd>`` as ``python -m herd.<cmd> ARGS`` would (runpy, in
this process: ``sys.argv``, ``__main__`` and its ``__spec__`` are the module's, so Hydra's job
name, Lightning's DDP launcher and multiprocessing see ``python -m herd.<cmd>``). This module
imports no entry point: the commands are found by reading ``src/herd/*.py`` (a module with an
``if __name__ == "__main__":`` block is a command), and their one-line descriptions are their
docstrings' first paragraphs, read without importing them (so ``--help`` needs no torch).
"""

from __future__ import annotations

import ast
import difflib
import re
import runpy
import shutil
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from herd.paths import repo_root

PACKAGE = Path(__file__).resolve().parent
USAGE_STATUS = 2
# The order of `herd --help` (the order of a project: data, training, using a model, recipes); a
# command not listed here comes after them, by name.
ORDER = ("prepare", "curate", "inspect", "train", "export", "evaluate", "generate", "chat", "score",
         "rejection_sample", "average", "pipeline", "scaling")
HELP_FLAGS = ("-h", "--help")


def _is_main_guard(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":`` at module level."""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare):
        return False
    test = node.test
    sides = [test.left, *test.comparators]
    names = [s.id for s in sides if isinstance(s, ast.Name)]
    values = [s.value for s in sides if isinstance(s, ast.Constant)]
    return len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq) and names == ["__name__"] and values == ["__main__"]


def commands() -> dict[str, str]:
    """Every entry point of the package, ``{name: one-line description}``, in ``herd --help``'s order."""
    found = {}
    for path in PACKAGE.glob("*.py"):
        if path.stem.startswith("_"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        if any(_is_main_guard(node) for node in tree.body):
            found[path.stem] = summary_line(ast.get_docstring(tree) or "", path.stem)
    rank = {name: i for i, name in enumerate(ORDER)}
    return dict(sorted(found.items(), key=lambda item: (rank.get(item[0], len(ORDER)), item[0])))


def summary_line(docstring: str, name: str) -> str:
    """A docstring's first paragraph as one line: reST literals plain, a leading ``herd.X:`` dropped."""
    first = " ".join(docstring.strip().split("\n\n", 1)[0].split())
    first = first.replace("``", "`")
    first = re.sub(rf"^herd\.{name}:\s*", "", first)
    return first[:1].upper() + first[1:]


def overview() -> str:
    """``herd --help``: the commands with one line each."""
    found = commands()
    width = max(len(name) for name in found) + 2
    wrap = max(60, min(shutil.get_terminal_size((100, 24)).columns, 110)) - width - 2
    lines = ["usage: herd <command> [key=value ...]   (the same as python -m herd.<command> [key=value ...])",
             "", "commands:"]
    for name, line in found.items():
        wrapped = textwrap.wrap(line, wrap) or [""]
        lines.append(f"  {name.ljust(width)}{wrapped[0]}")
        lines += [f"  {' ' * width}{more}" for more in wrapped[1:]]
    lines += ["", "herd <command> --help      the command's keys with their comments (and its config groups)",
              "herd <command> --hydra-help    Hydra's own flags; herd <command> --cfg job prints the composed config"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ herd <cmd> --help


def _config_dir() -> Path:
    return repo_root() / "configs"


def _first_comment(path: Path) -> str:
    """The first comment paragraph of a config file as one line (``# @package`` lines skipped), up to an
    indented line (a command example) or an empty comment line."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text.startswith("#"):
            if words or text:
                break
            continue
        body = text[1:]
        if body.strip().startswith("@package"):
            continue
        if not body.strip() or (words and body.startswith("  ")):
            if words:
                break
            continue
        words += body.split()
    return " ".join(words)


def _shortened(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1].rstrip(" ,;:") + "…"


def _groups(config: Path) -> list[tuple[str, str | None]]:
    """The config groups of a primary config's defaults list, with their default option (None: none)."""
    from omegaconf import OmegaConf  # light: no torch

    data = OmegaConf.to_container(OmegaConf.load(config), resolve=False) or {}
    out = []
    for entry in data.get("defaults") or []:
        if not isinstance(entry, dict) or len(entry) != 1:
            continue
        ((key, value),) = entry.items()
        key = str(key)
        if key.startswith(("override ", "optional ")) or "@" in key or "/" in key:
            continue
        out.append((key, None if value is None else str(value)))
    return out


def command_help(name: str, args: Sequence[str] = ()) -> str | None:
    """``herd <name> --help [group=option ...]``: the config with its comments, its groups and their
    options, and the keys of each ``group=option`` given (None: the command has no config)."""
    configs = _config_dir()
    config = configs / f"{name}.yaml"
    if not config.is_file():
        return None
    groups = [(group, default) for group, default in _groups(config) if (configs / group).is_dir()]
    chosen = dict(_chosen(args, {group for group, _ in groups}))
    usage = "[group=option ...] [key=value ...]" if groups else "[key=value ...]"
    out = [f"usage: herd {name} {usage}   (python -m herd.{name} ...)", "", commands().get(name, ""), ""]
    if groups:
        out.append("config groups (group=option; * marks the default, or the option given):")
        for group, default in groups:
            out.append(f"  {group}:")
            options = sorted((configs / group).glob("*.yaml"))
            width = max(len(p.stem) for p in options) + 2 if options else 0
            for option in options:
                mark = "*" if option.stem == chosen.get(group, default) else " "
                out.append(f"   {mark}{option.stem.ljust(width)}{_shortened(_first_comment(option), 90)}".rstrip())
        out.append("")
    out += [f"keys of {name} ({_shown(config)}):", ""]
    out += _indented(config)
    for group, option in chosen.items():
        path = configs / group / f"{option}.yaml"
        where = "key=..." if "@package _global_" in path.read_text(encoding="utf-8") else f"{group}.<key>=..."
        out += ["", f"keys of {group}={option} ({_shown(path)}; set as {where}):", ""]
        out += _indented(path)
    out.append("")
    if groups:
        example = groups[0][0]
        out.append(f"An option's keys: herd {name} --help {example}=<option>.")
    out.append(f"Hydra's own flags: herd {name} --hydra-help; the composed config: herd {name} --cfg job [overrides].")
    return "\n".join(out)


def _chosen(args: Sequence[str], groups: set[str]) -> list[tuple[str, str]]:
    """The ``group=option`` arguments that name an option file of one of ``groups``."""
    out = []
    for arg in args:
        group, equals, option = arg.partition("=")
        if equals and group in groups and (_config_dir() / group / f"{option}.yaml").is_file():
            out.append((group, option))
    return out


def _shown(path: Path) -> str:
    root = repo_root()
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _indented(path: Path) -> list[str]:
    return ["  " + text if text else "" for text in path.read_text(encoding="utf-8").rstrip().splitlines()]


# --------------------------------------------------------------------------------------- running


def run_command(name: str, args: Sequence[str]) -> None:
    """Run ``herd.<name>`` as ``python -m herd.<name> args`` would, in this process."""
    sys.argv = [str(PACKAGE / f"{name}.py"), *args]  # runpy sets argv[0] to the module's file as python -m does
    runpy.run_module(f"herd.{name}", run_name="__main__", alter_sys=True)


def main(argv: Sequence[str] | None = None) -> None:
    """``herd <command> [args]``; see the module docstring."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in HELP_FLAGS:
        print(overview())
        return
    if args[0] == "--version":
        import herd

        print(f"herd {herd.__version__}")
        return
    name, rest = args[0], args[1:]
    found = commands()
    if name not in found:
        close = difflib.get_close_matches(name, list(found), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"herd: unknown command {name!r}{hint}; the commands are: {', '.join(found)}", file=sys.stderr)
        sys.exit(USAGE_STATUS)
    if any(arg in HELP_FLAGS for arg in rest):
        text = command_help(name, [arg for arg in rest if arg not in HELP_FLAGS])
        if text is not None:
            print(text)
            return
    run_command(name, rest)


if __name__ == "__main__":
    main()

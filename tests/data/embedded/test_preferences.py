"""The embedded preference set: stdlib answers ranked edited > chosen > rejected, grouped by module."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from omegaconf import OmegaConf

from herd.data.chat import Llama3Format
from herd.data.embedded.corpus import module_name, stdlib_dir, stdlib_files
from herd.data.embedded.preferences import PreferenceExample, stdlib_preferences
from herd.data.embedded.sft import module_definitions, reference_answer, stdlib_sft
from herd.data.kinds import assign_split
from herd.data.kinds.preference import encode_ranking, iter_rankings, record_ranking
from herd.paths import repo_root
from herd.prepare import prepare

SHAPES = '''"""Shapes."""


def area(width, height=1):
    """Return the area of a rectangle."""


def perimeter(width, height=1) -> float:
    """Return the perimeter of a rectangle."""


class Circle:
    """A circle of some radius."""

    def __init__(self, radius):
        """Make one."""

    def grow(self, by=1):
        """Make the circle larger by some amount."""
'''

LONELY = '''def only(x):
    """The one documented function of its module."""
'''

PAIR = '''def first(a):
    """The first of two functions here."""


def second(b):
    """The second of two functions here."""
'''


@pytest.fixture
def fake_stdlib(tmp_path):
    """Three modules: four definitions in shapes, one in lonely, two in pair."""
    for name, source in (("shapes", SHAPES), ("lonely", LONELY), ("pair", PAIR)):
        (tmp_path / f"{name}.py").write_text(source)
    return tmp_path


def _definitions(root):
    return {d.name: d for module in ("shapes", "lonely", "pair")
            for d in module_definitions((root / f"{module}.py").read_text(), module)}  # fmt: skip


def _renamed(signature: str, name: str, wrong: str) -> str:
    prefix = "class " if signature.startswith("class ") else ""
    assert signature.startswith(prefix + name)
    return prefix + wrong + signature[len(prefix + name) :]


def _check(example: PreferenceExample, definitions, sft) -> None:
    """Every property of an example, checked against stdlib:sft and the module sources."""
    module, qualname, index = example.id.removeprefix("pref/").split("/")
    name = f"{module}.{qualname}"
    definition, other = definitions[name], definitions[example.rejected_from]
    assert (example.group, index) == (module, "0")
    sft_dialog = sft[f"sft/{module}/{qualname}/0"]
    assert example.prompt == sft_dialog.messages[:-1]  # stdlib:sft's question
    assert example.edited == reference_answer(sft_dialog)  # the true answer, as stdlib:sft gives it
    assert f"`{definition.signature}`" in example.edited and definition.summary in example.edited
    # chosen: the true answer but for the name in its signature, another definition's
    assert example.wrong_name != name and example.wrong_name.startswith(f"{module}.")
    assert example.wrong_name.removeprefix(f"{module}.") in {d.qualname for d in definitions.values()}
    wrong_signature = _renamed(definition.signature, name, example.wrong_name)
    assert example.chosen == example.edited.replace(f"`{definition.signature}`", f"`{wrong_signature}`")
    # rejected: another definition's signature and summary, in the same phrasing
    assert example.rejected_from != name
    expected = example.edited.replace(f"`{definition.signature}`", f"`{other.signature}`")
    assert example.rejected == expected.replace(definition.summary, other.summary)
    assert len(set(example.answers)) == 3
    assert example.record()["responses"] == [{"content": a, "rank": r} for r, a in enumerate(example.answers)]


def test_three_ranked_answers_per_definition(fake_stdlib):
    examples = list(stdlib_preferences(fake_stdlib))
    definitions = _definitions(fake_stdlib)
    sft = {d.id: d for d in stdlib_sft(fake_stdlib)}
    assert [e.id for e in examples] == [
        "pref/lonely/only/0", "pref/pair/first/0", "pref/pair/second/0", "pref/shapes/area/0",
        "pref/shapes/perimeter/0", "pref/shapes/Circle/0", "pref/shapes/Circle.grow/0",
    ]  # fmt: skip
    for example in examples:
        _check(example, definitions, sft)
    by_id = {e.id: e for e in examples}
    # a module's own definitions give the wrong names and answers, a different one for each where it can
    shapes = [by_id[f"pref/shapes/{q}/0"] for q in ("area", "perimeter", "Circle", "Circle.grow")]
    assert all(e.wrong_name.startswith("shapes.") and e.rejected_from.startswith("shapes.") for e in shapes)
    assert all(e.wrong_name != e.rejected_from for e in shapes)
    assert (by_id["pref/pair/first/0"].wrong_name, by_id["pref/pair/first/0"].rejected_from) == (
        "pair.second", "pair.second",
    )  # fmt: skip
    # a module of one definition borrows from the nearest module (lonely is first: the next one), keeping
    # its own module name in the wrong signature
    lonely = by_id["pref/lonely/only/0"]
    assert lonely.wrong_name in {"lonely.first", "lonely.second"}
    assert lonely.rejected_from in {"pair.first", "pair.second"}


def test_runs_are_deterministic_and_seeds_change_answers_not_ids(fake_stdlib):
    runs = {seed: list(stdlib_preferences(fake_stdlib, seed=seed)) for seed in range(6)}
    assert list(stdlib_preferences(fake_stdlib)) == runs[0]
    assert all([e.id for e in run] == [e.id for e in runs[0]] for run in runs.values())
    assert len({tuple(e.answers for e in run) for run in runs.values()}) > 1
    definitions = _definitions(fake_stdlib)
    for seed, run in runs.items():
        sft = {d.id: d for d in stdlib_sft(fake_stdlib, seed=seed)}
        for example in run:
            _check(example, definitions, sft)


def test_options_cap_modules_and_add_a_system_message(fake_stdlib):
    capped = list(stdlib_preferences(fake_stdlib, max_per_module=1, system="Be terse."))
    assert [e.id for e in capped] == ["pref/lonely/only/0", "pref/pair/first/0", "pref/shapes/area/0"]
    assert all(e.prompt[0] == {"role": "system", "content": "Be terse."} for e in capped)
    full = {e.id: e for e in stdlib_preferences(fake_stdlib, system="Be terse.")}
    assert all(e == full[e.id] for e in capped)  # the cap leaves the answers as they were


def test_a_module_without_any_other_definition_is_left_out(tmp_path):
    (tmp_path / "lonely.py").write_text(LONELY)
    assert list(stdlib_preferences(tmp_path)) == []


# --- the real standard library --------------------------------------------------------------------


@pytest.fixture(scope="module")
def stdlib_examples() -> list[PreferenceExample]:
    return list(stdlib_preferences())


def test_the_stdlib_gives_thousands_of_well_formed_examples(stdlib_examples):
    assert len(stdlib_examples) > 3000
    assert len({e.id for e in stdlib_examples}) == len(stdlib_examples)
    assert len({e.group for e in stdlib_examples}) > 100
    root = stdlib_dir().resolve()
    definitions = {}
    for path in stdlib_files(root):
        module = module_name(path.relative_to(root).as_posix())
        definitions.update((d.name, d) for d in module_definitions(path.read_bytes(), module))
    sft = {d.id: d for d in stdlib_sft()}
    for example in stdlib_examples:
        _check(example, definitions, sft)
        ranking = record_ranking(example.record(), example.id, example.id)  # a usable ranking
        assert [r.rank for r in ranking.responses] == [0, 1, 2] and ranking.group == example.group


def test_a_known_stdlib_example(stdlib_examples):
    example = next(e for e in stdlib_examples if e.id == "pref/json/dumps/0")
    assert "`json.dumps(obj, *, skipkeys=False" in example.edited
    assert "Serialize ``obj`` to a JSON formatted ``str``." in example.edited
    assert example.wrong_name.startswith("json.") and example.wrong_name != "json.dumps"
    assert f"`{example.wrong_name}(obj, *, skipkeys=False" in example.chosen
    assert example.rejected_from.startswith("json.") and example.rejected_from != "json.dumps"
    assert "json.dumps" in example.prompt[-1]["content"] or "`dumps`" in example.prompt[-1]["content"]


def test_prepare_reads_stdlib_preferences_as_a_preference_source_held_out_by_module(tiny_tokenizer, tmp_path):
    item = "stdlib:preferences?max_per_module=2"
    cfg = OmegaConf.load(repo_root() / "configs" / "prepare.yaml")
    cfg.pop("hydra")
    cfg.merge_with({"output_dir": str(tmp_path / "out"), "seq_len": 2047, "val_fraction": 0.2, "num_proc": 1,
                    "progress": False, "tokenizer": {"path": str(tiny_tokenizer.save(tmp_path / "tok"))}})  # fmt: skip
    cfg.sources = {"prefs": {"input": item}}  # no kind: the input makes it a preference source
    out = prepare(cfg)
    entry = json.loads((out / "manifest.json").read_text())["sources"]["prefs"]
    assert entry["kind"] == "preference" and entry["too_long"] == 0
    rankings = list(iter_rankings(item))
    held_out = {r.group for r in rankings if assign_split(r.group, 0.2) == "val"}
    assert 0 < len(held_out) < len({r.group for r in rankings})
    assert entry["groups"] == {"train": len({r.group for r in rankings}) - len(held_out), "val": len(held_out)}
    for split in ("train", "val"):
        expected = sorted(
            tuple(encode_ranking(Llama3Format(tiny_tokenizer), r).ids.tolist())
            for r in rankings
            if (r.group in held_out) == (split == "val")
        )
        assert entry["splits"][split]["documents"] == len(expected)
        assert entry["splits"][split]["pairs"] == 3 * len(expected)
        assert sorted(_stored_rankings(out, entry["splits"][split])) == expected  # whole modules per split


def _stored_rankings(folder, split_entry) -> list[tuple[int, ...]]:
    """The token ids of each ranking stored in a split."""
    import numpy as np

    found = []
    for shard in split_entry["shards"]:
        with tarfile.open(folder / shard["path"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted({name.split(".")[0] for name in members}):
            tokens, docs = (np.load(io.BytesIO(members[f"{key}.{p}.npy"])) for p in ("tokens", "document_ids"))
            found += [tuple(tokens[docs == doc].tolist()) for doc in np.unique(docs[docs >= 0])]
    return found

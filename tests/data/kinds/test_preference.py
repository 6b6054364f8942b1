"""Preference sources: the shared-prompt row, the input layouts, bad lines, prepare and the batches it gives."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from herd.data.chat import Llama3Format, encode_dialog
from herd.data.inputs import BadInputError
from herd.data.kinds import BadInputs, PrepareError
from herd.data.kinds.preference import (
    BAD_INPUT_REASONS,
    Ranking,
    Response,
    encode_ranking,
    iter_rankings,
    preference_options,
    record_ranking,
    response_order,
)
from herd.data.loaders.packed import PackedDataModule
from herd.data.packing import IGNORE_INDEX
from herd.paths import repo_root
from herd.prepare import prepare

HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
PROMPT = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "What is the capital of France?"},
]
ANSWERS = [("Lyon", 1), ("Paris", 0), ("Berlin, the capital of Germany", 2)]


def _ranking(ranking_id: str = "capital", answers=ANSWERS, prompt=PROMPT) -> Ranking:
    responses = [Response({"role": "assistant", "content": text}, rank) for text, rank in answers]
    return Ranking(ranking_id, prompt, responses)


def _spans(values: np.ndarray) -> dict[int, np.ndarray]:
    """Positions of each value, checked to be one contiguous run."""
    spans = {}
    for value in np.unique(values):
        where = np.flatnonzero(values == value)
        assert (np.diff(where) == 1).all(), f"{value} is not contiguous"
        spans[int(value)] = where
    return spans


def test_a_row_is_the_prompt_then_each_response_as_encode_dialog_adds_it(tiny_tokenizer):
    ranking = _ranking()
    encoded = encode_ranking(Llama3Format(tiny_tokenizer), ranking)
    prompt = encode_dialog(tiny_tokenizer, PROMPT).ids
    assert tiny_tokenizer.decode(prompt) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer in one word.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
    )  # the prompt's turns, and no assistant header after them
    lengths = {len(encoded.ids), len(encoded.loss_mask), len(encoded.response_ids), len(encoded.ranks)}
    assert len(lengths) == 1
    spans = _spans(encoded.response_ids)
    assert sorted(spans) == [0, 1, 2, 3]
    assert spans[0].tolist() == list(range(len(prompt)))  # the prompt first, once
    assert encoded.ids[: len(prompt)].tolist() == prompt
    assert (encoded.ranks[spans[0]] == -1).all() and not encoded.loss_mask[spans[0]].any()
    order = response_order(ranking)
    assert sorted(order) == [0, 1, 2]
    for k, index in enumerate(order, start=1):
        message = ranking.responses[index].message
        span = spans[k]
        alone = encode_dialog(tiny_tokenizer, [*PROMPT, message]).ids
        assert encoded.ids[span].tolist() == alone[len(prompt) :]  # the response read after the prompt alone
        assert tiny_tokenizer.decode(encoded.ids[span].tolist()) == f"{HEADER}{message['content']}<|eot_id|>"
        trained = encoded.ids[span][encoded.loss_mask[span]].tolist()
        assert tiny_tokenizer.decode(trained) == message["content"]  # content only: no header, no eot
        assert (encoded.ranks[span] == ranking.responses[index].rank).all()
    assert spans[len(order)][-1] == len(encoded.ids) - 1  # the last response ends the ranking's span


def test_the_response_order_is_a_shuffle_seeded_by_the_id():
    orders = {tuple(response_order(_ranking(f"r{i}"))) for i in range(40)}
    assert len(orders) == 6  # every order of three responses occurs
    assert response_order(_ranking("r7")) == response_order(_ranking("r7"))


def test_pairs_leave_ties_out():
    assert _ranking(answers=[("a", 0), ("b", 0), ("c", 1)]).pairs == 2
    assert _ranking(answers=[("a", 0), ("b", 1), ("c", 2), ("d", 2)]).pairs == 5


# --- input layouts ---------------------------------------------------------------------------------

QUESTION = "What is 2+2?"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]

SAME_RANKING = [
    {"prompt": QUESTION, "responses": [{"content": "4", "rank": 0}, {"content": "5", "rank": 1}]},
    {"prompt": QUESTION, "chosen": "4", "rejected": "5"},
    {"prompt": [{"role": "user", "content": QUESTION}], "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "5"}]},
    {"chosen": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "4"}],
     "rejected": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "5"}]},
]  # fmt: skip


def _read(record):
    return record_ranking(record, "f.jsonl:1", "f.jsonl:1")


def test_the_ranking_and_both_trl_layouts_read_to_the_same_ranking():
    expected = Ranking(
        "f.jsonl:1",
        [{"role": "user", "content": QUESTION}],
        [Response({"role": "assistant", "content": "4"}, 0), Response({"role": "assistant", "content": "5"}, 1)],
    )
    assert [_read(record) for record in SAME_RANKING] == [expected] * len(SAME_RANKING)
    # a multi-turn implicit prompt: the longest common start of chosen and rejected
    turns = [*MESSAGES, {"role": "assistant", "content": "Ask."}, {"role": "user", "content": "Again?"}]
    implicit = _read({"chosen": [*turns, {"role": "assistant", "content": "Yes"}],
                      "rejected": [*turns, {"role": "assistant", "content": "No"}]})  # fmt: skip
    explicit = _read({"prompt": turns, "responses": [{"content": "Yes", "rank": 0}, {"content": "No", "rank": 1}]})
    assert implicit == explicit and len(implicit.prompt) == 4


def test_ids_groups_and_chat_flags_are_kept():
    ranking = _read({
        "id": "q-17", "group": "arithmetic", "prompt": MESSAGES,
        "responses": [{"content": "print(4)", "rank": 1, "python_tag": True}, {"content": "4", "rank": 0},
                      {"role": "assistant", "content": "four", "rank": 0}],
    })  # fmt: skip
    assert (ranking.id, ranking.group, ranking.split_key, ranking.pairs) == ("q-17", "arithmetic", "arithmetic", 2)
    assert ranking.responses[0] == Response({"role": "assistant", "content": "print(4)", "python_tag": True}, 1)
    assert _read(SAME_RANKING[0]).split_key == "f.jsonl:1"


BAD_LINES = [
    ('{"prompt": oops}', "malformed_json"),
    ('["prompt", "responses"]', "not_an_object"),
    ('{"text": "not a ranking"}', "no_responses"),
    ('{"responses": [{"content": "a", "rank": 0}, {"content": "b", "rank": 1}]}', "no_prompt"),
    ('{"prompt": [], "chosen": "a", "rejected": "b"}', "no_prompt"),
    ('{"chosen": "a", "rejected": "b"}', "no_prompt"),
    ('{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
     '"rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "b"}]}', "no_prompt"),
    ('{"prompt": "q", "responses": [{"content": "a", "rank": 0}]}', "too_few_responses"),
    ('{"prompt": "q", "chosen": "a"}', "too_few_responses"),
    ('{"prompt": "q", "responses": "a and b"}', "bad_message"),
    ('{"prompt": 7, "chosen": "a", "rejected": "b"}', "bad_message"),
    ('{"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}], '
     '"rejected": "c"}', "bad_message"),
    ('{"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}', "bad_message"),
    ('{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
     '"rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}, '
     '{"role": "user", "content": "c"}]}', "bad_message"),
    ('{"prompt": "q", "responses": [{"content": "a", "rank": 0}, "b"]}', "bad_message"),
    ('{"group": 3, "prompt": "q", "chosen": "a", "rejected": "b"}', "bad_message"),
    ('{"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"}', "unknown_role"),
    ('{"prompt": "q", "responses": [{"content": "a", "rank": 0}, {"role": "critic", "content": "b", "rank": 1}]}',
     "unknown_role"),
    ('{"prompt": "  ", "chosen": "a", "rejected": "b"}', "empty_content"),
    ('{"prompt": "q", "chosen": "a", "rejected": ""}', "empty_content"),
    ('{"prompt": "q", "chosen": "nul \\u0000", "rejected": "b"}', "binary"),
    ('{"prompt": "q", "responses": [{"content": "a", "rank": 0}, {"content": "b"}]}', "bad_rank"),
    ('{"prompt": "q", "responses": [{"content": "a", "rank": 0}, {"content": "b", "rank": -1}]}', "bad_rank"),
    ('{"prompt": "q", "responses": [{"content": "a", "rank": 0}, {"content": "b", "rank": 1.5}]}', "bad_rank"),
    ('{"prompt": "q", "responses": [{"content": "a", "rank": 0}, {"content": "b", "rank": true}]}', "bad_rank"),
    ('{"prompt": "q", "responses": [{"content": "a", "rank": 1}, {"content": "b", "rank": 1}]}', "no_pairs"),
    ('{"prompt": "q", "chosen": "same", "rejected": " same\\n"}', "identical_responses"),
]  # fmt: skip


def test_each_bad_line_is_named_with_its_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(line.encode() for line, _ in BAD_LINES) + b'\n{"prompt": "\xff"}\n')
    errors: list[BadInputError] = []
    assert list(iter_rankings(str(path), on_bad_input=errors.append)) == []
    assert [e.reason for e in errors] == [reason for _, reason in BAD_LINES] + ["not_utf8"]
    assert [e.location for e in errors] == [f"{path}:{n}" for n in range(1, len(BAD_LINES) + 2)]
    assert set(BAD_INPUT_REASONS) == {e.reason for e in errors} | {"too_many_responses", "too_long_line"}
    assert "not a usable preference ranking" in str(errors[3])
    with pytest.raises(BadInputError, match=f"{path}:1: malformed JSON"):
        list(iter_rankings(str(path)))


def test_identical_responses_at_different_ranks_are_a_counted_skip(tmp_path):
    """A pair whose chosen equals its rejected (after strip) teaches nothing: skipped as identical_responses.
    Equal texts at one rank (a tie) form no pair and stay."""
    path = tmp_path / "pairs.jsonl"
    lines = [
        {"prompt": "q", "chosen": "  An answer.\n", "rejected": "An answer."},
        {"prompt": "q", "responses": [{"content": "a", "rank": 0}, {"content": "b", "rank": 1},
                                      {"content": "a ", "rank": 2}]},
        {"prompt": "q", "responses": [{"content": "a", "rank": 0}, {"content": "a", "rank": 0},
                                      {"content": "b", "rank": 1}]},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    errors: list[BadInputError] = []
    kept = list(iter_rankings(str(path), on_bad_input=errors.append))
    assert [e.reason for e in errors] == ["identical_responses"] * 2
    assert [e.location for e in errors] == [f"{path}:1", f"{path}:2"]
    assert "response 2 (rank 2) is the same text as response 0 (rank 0)" in str(errors[1])
    assert [r.id for r in kept] == ["pairs.jsonl:3"]
    bad_inputs = BadInputs("skip", "pairs", log=False)
    list(iter_rankings(str(path), on_bad_input=bad_inputs))
    assert bad_inputs.skipped == {"identical_responses": 2}


def test_stdlib_preferences_options_parse_like_sft():
    assert preference_options("stdlib:preferences") == {}
    assert preference_options("stdlib:preferences?seed=1&max_per_module=20&system=Be+terse.") == {
        "seed": 1, "max_per_module": 20, "system": "Be terse.",
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown option 'per_definition'"):
        preference_options("stdlib:preferences?per_definition=2")
    with pytest.raises(ValueError, match="seed='x' must be an integer"):
        preference_options("stdlib:preferences?seed=x")


# --- prepare end to end, and the batches -----------------------------------------------------------


def _config(out, sources, **overrides):
    cfg = OmegaConf.load(repo_root() / "configs" / "prepare.yaml")
    cfg.pop("hydra")
    cfg.merge_with({"output_dir": str(out), "seq_len": 127, "val_fraction": 0.0, "num_proc": 1, "progress": False,
                    "shards": {"max_rows": 64, "min_count": 1}, **overrides})  # fmt: skip
    cfg.sources = sources
    return cfg


def _records(count: int) -> list[dict]:
    """Rankings of 2 to 4 responses in the input layouts, one far too long for a row of 128."""
    records = []
    for i in range(count):
        question = f"What is {i} plus {i}?"
        answers = [f"It is {2 * i}.", f"Maybe {2 * i + 1}.", f"I think it is {i}.", "No idea."][: 2 + i % 3]
        if i % 2:
            records.append({"prompt": question, "chosen": answers[0], "rejected": answers[1]})
        else:
            records.append({"prompt": [{"role": "user", "content": question}],
                            "responses": [{"content": a, "rank": r} for r, a in enumerate(answers)]})  # fmt: skip
    records.append({"prompt": "Tell me everything. " * 40, "chosen": "Everything.", "rejected": "Nothing."})
    return records


def _jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def prepared(tiny_tokenizer, tmp_path_factory):
    """A preference source of 24 rankings (and one too long) and a text source, prepared."""
    root = tmp_path_factory.mktemp("prefs")
    records = _records(24)
    data = _jsonl(root / "in" / "ranked.jsonl", records)
    (root / "notes").mkdir()
    (root / "notes" / "a.txt").write_text("What is two plus two? " * 60)
    folder = tiny_tokenizer.save(root / "tokenizer")
    out = prepare(_config(root / "out", {"prefs": {"input": str(data), "kind": "preference"},
                                         "notes": {"input": str(root / "notes")}},
                          tokenizer={"path": str(folder)}))  # fmt: skip
    rankings = [record_ranking(r, "x", f"ranked.jsonl:{n}") for n, r in enumerate(records, start=1)]
    return out, rankings


def _stored_rows(folder: Path, source: str):
    """Every stored row of the train split as a dict of its members."""
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = []
    for shard in manifest["sources"][source]["splits"]["train"]["shards"]:
        with tarfile.open(folder / shard["path"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted({name.split(".")[0] for name in members}):
            parts = ("tokens", "document_ids", "loss_mask", "response_ids", "ranks")
            rows.append({p: np.load(io.BytesIO(members[f"{key}.{p}.npy"]), allow_pickle=False) for p in parts})
    return rows


def test_prepare_writes_each_ranking_once_whole_with_its_members(prepared, tiny_tokenizer):
    out, rankings = prepared
    entry = json.loads((out / "manifest.json").read_text())["sources"]["prefs"]
    fits, long = rankings[:-1], rankings[-1]
    assert len(encode_ranking(Llama3Format(tiny_tokenizer), long).ids) > 127
    assert (entry["kind"], entry["layout"]) == (
        "preference", {"members": ["tokens", "document_ids", "loss_mask", "response_ids", "ranks"], "packing": "whole"},
    )  # fmt: skip
    assert (entry["examples"], entry["too_long"], entry["skipped"]) == (24, 1, {})
    assert entry["responses"] == sum(len(r.responses) for r in fits)
    assert entry["pairs"] == sum(r.pairs for r in fits) == 12 * 1 + 4 * 1 + 4 * 3 + 4 * 6
    rows = _stored_rows(out, "prefs")
    found = []
    for row in rows:
        docs = row["document_ids"]
        assert docs[-1] == -1  # the last token of every row is padding
        for doc in np.unique(docs[docs >= 0]):
            where = np.flatnonzero(docs == doc)
            assert (np.diff(where) == 1).all()
            found.append(tuple(tuple(row[p][where].tolist()) for p in ("tokens", "loss_mask", "response_ids", "ranks")))
        pad = docs < 0
        assert (row["loss_mask"][pad] == 0).all() and (row["response_ids"][pad] == 0).all()
        assert (row["ranks"][pad] == -1).all()
        assert row["response_ids"].dtype == row["ranks"].dtype == np.int16
    expected = []
    for ranking in fits:
        e = encode_ranking(Llama3Format(tiny_tokenizer), ranking)
        expected.append(tuple(tuple(a.tolist()) for a in (e.ids, e.loss_mask.astype(np.uint8), e.response_ids, e.ranks)))
    assert sorted(found) == sorted(expected)  # each ranking once, whole, with its members
    assert entry["tokens"] == sum(len(e[0]) for e in expected)
    assert entry["trained_tokens"] == sum(sum(e[1]) for e in expected)


def test_the_batches_of_a_preference_source(prepared, tiny_tokenizer):
    out, _ = prepared
    dm = PackedDataModule(str(out), {"prefs": {}}, seq_len=127, batch_size=4, num_workers=0, shuffle_buffer=1)
    batches = list(zip(dm.train_dataloader(), range(3), strict=False))
    eot = tiny_tokenizer.special_id("eot_id")
    for batch, _ in batches:
        assert set(batch) == {"tokens", "document_ids", "targets", "response_ids", "ranks"}
        assert {tuple(v.shape) for v in batch.values()} == {(4, 127)}
        tokens, docs, targets, response_ids, ranks = (batch[k].numpy() for k in
                                                      ("tokens", "document_ids", "targets", "response_ids", "ranks"))  # fmt: skip
        for row in range(4):
            trained = np.flatnonzero(targets[row] != IGNORE_INDEX)
            assert len(trained) and trained[-1] < 126  # the last input predicts the row's padding: never trained
            assert (targets[row][trained] == tokens[row][trained + 1]).all()  # the next token ...
            following = response_ids[row][trained + 1]
            assert (following > 0).all() and (following == response_ids[row][trained]).all()  # ... of a response
            assert "<|" not in tiny_tokenizer.decode(targets[row][trained].tolist())  # content only: no header, no eot
            responses = {(d, k) for d, k in zip(docs[row], response_ids[row], strict=True) if k > 0}
            for doc, k in responses:  # every response's eot is an input position, and one rank holds for it
                span = np.flatnonzero((response_ids[row] == k) & (docs[row] == doc))
                assert (np.diff(span) == 1).all() and tokens[row][span[-1]] == eot
                assert len(set(ranks[row][span].tolist())) == 1 and ranks[row][span[0]] >= 0
            assert (ranks[row][response_ids[row] == 0] == -1).all()


def test_targets_are_exactly_the_next_content_tokens(prepared, tiny_tokenizer):
    out, _ = prepared
    dm = PackedDataModule(str(out), {"prefs": {}}, seq_len=127, batch_size=1, num_workers=0, shuffle_buffer=1)
    batch = next(iter(dm.train_dataloader()))
    rows = _stored_rows(out, "prefs")
    stored = next(r for r in rows if (r["tokens"][:127] == batch["tokens"][0].numpy()).all())
    expected = np.full(127, IGNORE_INDEX)
    content = stored["loss_mask"].astype(bool)
    expected[content[1:]] = stored["tokens"][1:][content[1:]]
    assert batch["targets"][0].tolist() == expected.tolist()
    assert batch["response_ids"][0].tolist() == stored["response_ids"][:127].tolist()
    assert batch["ranks"][0].tolist() == stored["ranks"][:127].tolist()


def test_a_preference_source_does_not_mix_with_text_and_keeps_its_length(prepared):
    out, _ = prepared
    with pytest.raises(ValueError, match=r"batches would have different keys: 'prefs' \(tokens, document_ids, "
                                         r"targets, response_ids, ranks\), 'notes' \(tokens, document_ids, targets\)"):  # fmt: skip
        PackedDataModule(str(out), {"prefs": {}, "notes": {}}, seq_len=127, num_workers=0)
    with pytest.raises(ValueError, match="source 'prefs' holds rankings packed whole into rows of seq_len=127"):
        PackedDataModule(str(out), {"prefs": {}}, seq_len=63, num_workers=0)
    text = PackedDataModule(str(out), {"notes": {}}, seq_len=31, batch_size=2, num_workers=0, shuffle_buffer=1)
    assert set(next(iter(text.train_dataloader()))) == {"tokens", "document_ids", "targets"}


def test_bad_lines_are_counted_and_the_limit_holds(tiny_tokenizer, tmp_path):
    good = [json.dumps(r) for r in _records(40)[:-1]]  # 40 rankings, none too long
    path = tmp_path / "in" / "mixed.jsonl"
    path.parent.mkdir()
    path.write_text("\n".join(good[:20] + [line for line, _ in BAD_LINES[:4]] + good[20:]) + "\n")
    folder = tiny_tokenizer.save(tmp_path / "tokenizer")
    sources = {"prefs": {"input": str(path), "kind": "preference"}}
    out = prepare(_config(tmp_path / "out", sources, tokenizer={"path": str(folder)}))
    entry = json.loads((out / "manifest.json").read_text())["sources"]["prefs"]
    assert entry["skipped"] == {"malformed_json": 1, "no_prompt": 1, "no_responses": 1, "not_an_object": 1}
    assert entry["examples"] == 40
    with pytest.raises(PrepareError, match=r"4 of 44 inputs \(9.1%\) were bad .* more than max_bad_fraction=0.05"):
        prepare(_config(tmp_path / "fail", sources, tokenizer={"path": str(folder)}, max_bad_fraction=0.05))
    with pytest.raises(PrepareError, match="all 1 rankings .* are longer than seq_len = 127 tokens"):
        prepare(_config(tmp_path / "long", {"prefs": {"input": str(_jsonl(tmp_path / "long.jsonl", _records(0))),
                                                      "kind": "preference"}},
                        tokenizer={"path": str(folder)}))  # fmt: skip


# Prepares a preference jsonl once to warm up, then again with a 20 MB line in it, and prints the peak
# Python allocations (tracemalloc) and the growth of the peak resident memory during that second run.
PEAK_SCRIPT = """
import json, sys, time, tracemalloc
from pathlib import Path
from omegaconf import OmegaConf
from herd.prepare import prepare
root, tokenizer, small, big, config = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
def run(name, data):
    cfg = OmegaConf.load(config)
    cfg.pop("hydra")
    cfg.merge_with({"output_dir": str(root / name), "seq_len": 127, "val_fraction": 0.0, "num_proc": 1,
                    "progress": False, "shards": {"max_rows": 64, "min_count": 1}, "tokenizer": {"path": tokenizer}})
    cfg.sources = {"prefs": {"input": data, "kind": "preference"}}
    return prepare(cfg)
def status(key):
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key))
    return int(line.split()[1]) * 1024
run("warm", small)
try:
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident size (VmHWM) to the current one
    resident = status("VmRSS:")
except OSError:  # not Linux: only the Python allocations are measured
    resident = None
tracemalloc.start()
started = time.perf_counter()
out = run("big", big)
seconds = time.perf_counter() - started
peak_python = tracemalloc.get_traced_memory()[1]
peak_resident = status("VmHWM:") if resident is not None else 0
entry = json.loads((out / "manifest.json").read_text())["sources"]["prefs"]
print(json.dumps({"python_mb": peak_python / 1e6, "resident_growth_mb": (peak_resident - (resident or 0)) / 1e6,
                  "seconds": seconds, "skipped": entry["skipped"], "examples": entry["examples"]}))
"""


def test_a_20_mb_line_is_skipped_before_parsing_under_200_mb_peak(tiny_tokenizer, tmp_path):
    """A 20 MB ranking is dropped as too_long_line (max_line_bytes, 8 MiB) before it is decoded, parsed,
    rendered or tokenized: the run's peak memory grows by far less than 200 MB (in a fresh process)."""
    import subprocess
    import sys

    folder = tiny_tokenizer.save(tmp_path / "tokenizer")
    good = [json.dumps(r) for r in _records(12)[:-1]]
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(good) + "\n")
    huge = json.dumps({"prompt": "q", "chosen": "a" * 20_000_000, "rejected": "b"})
    big = tmp_path / "big.jsonl"
    big.write_text("\n".join([*good[:3], huge, *good[3:]]) + "\n")
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path), str(folder), str(small), str(big),
                           str(repo_root() / "configs" / "prepare.yaml")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    print(measured)
    assert measured["skipped"] == {"too_long_line": 1} and measured["examples"] == 12
    assert measured["python_mb"] < 200 and measured["resident_growth_mb"] < 200, measured


@pytest.mark.parametrize("style", ["chatml", "llama2", "llama3"])
def test_scored_tokens_are_each_answers_content_only_in_every_chat_format(style, tmp_path):
    """DPO's log-probs cover the answers' content: no header, no end-of-turn, no template text."""
    from helpers.tokenizers import style_folder
    from herd.data.chat import chat_format
    from herd.data.kinds.preference import Ranking, Response
    from herd.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(style_folder(style, tmp_path / style))
    fmt = chat_format(tokenizer)
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    answers = ["Paris is the capital.", "It is Nice, I think."]
    ranking = Ranking("r", prompt, [Response({"role": "assistant", "content": a}, rank) for rank, a in enumerate(answers)])
    encoded = encode_ranking(fmt, ranking)
    n = len(fmt.encode(prompt).ids)
    assert encoded.ids[:n].tolist() == fmt.encode(prompt).ids and not encoded.loss_mask[:n].any()
    for k in (1, 2):
        piece = encoded.response_ids == k
        content = encoded.ids[piece & encoded.loss_mask].tolist()
        answer = answers[encoded.ranks[piece][0]]
        assert tokenizer.decode(content).strip() == answer
        assert not set(content) & set(fmt.stop_ids) and tokenizer.bos_id not in content
        # the piece is what the dialog prompt + answer adds after the prompt, through where the reward reads
        dialog = [*prompt, {"role": "assistant", "content": answer}]
        assert encoded.ids[piece].tolist() == fmt.response_ids(dialog)[n:]

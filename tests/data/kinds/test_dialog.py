"""Dialog sources: reading and validation, loss masks, chat templates, whole packing, prepare end to end."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from omegaconf import OmegaConf
from tokenizers import AddedToken, Regex, models, pre_tokenizers

from herd.data.inputs import BadInputError
from herd.data.kinds import PrepareError, assign_split
from herd.data.kinds.dialog import (
    BAD_INPUT_REASONS,
    Dialog,
    dialog_encoder,
    iter_dialogs,
    record_dialog,
    sft_options,
)
from herd.data.loaders.packed import PackedDataModule
from herd.data.packing import IGNORE_INDEX, Rechunker
from herd.data.tokenizer import LLAMA3_CHAT_TEMPLATE, Tokenizer, llama3_special_tokens
from herd.paths import repo_root
from herd.prepare import prepare

# --- a word-level tokenizer whose ids are known by heart ----------------------------------------

WORDS = ["[UNK]", "system", "user", "assistant", "ipython", "\n\n", " ", "Hi", "Hello", "What", "is", "2", "+", "?",
         "4", "Thanks", ".", "You", "are", "welcome"]  # fmt: skip
USER, ASSISTANT, NN, SP, HI, HELLO, WHAT, IS, TWO, PLUS, QUESTION = 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13
FOUR, THANKS, DOT, YOU, ARE, WELCOME = 14, 15, 16, 17, 18, 19
BOS, EOS, SH, EH, EOT = 100, 101, 106, 107, 109  # the Llama 3 special tokens follow 100 word ids

QA = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "Thanks."},
    {"role": "assistant", "content": "You are welcome."},
]


def word_tokenizer() -> Tokenizer:
    """Words, spaces and punctuation as single tokens: "What is 2+2?" is [9, 6, 10, 6, 11, 12, 11, 13]."""
    vocab = {word: i for i, word in enumerate(WORDS + [f"w{i}" for i in range(len(WORDS), 100)])}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|\s+|[^\w\s]"), behavior="isolated")
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in llama3_special_tokens()]
    )
    return Tokenizer(backend)


@pytest.fixture(scope="module")
def words(tmp_path_factory) -> Path:
    """The word tokenizer, saved as a tokenizer folder."""
    return word_tokenizer().save(tmp_path_factory.mktemp("words") / "tokenizer")


def _targets(encoded) -> np.ndarray:
    """Training's targets for a row holding just this dialog."""
    (sample,) = Rechunker(len(encoded.ids) - 1).add(encoded.ids, np.zeros(len(encoded.ids), np.int32), 0,
                                                    encoded.loss_mask)  # fmt: skip
    return sample.targets


def test_one_dialogs_targets_match_a_mask_written_by_hand():
    encoded = dialog_encoder(word_tokenizer(), "herd")(Dialog("d", QA))
    assert encoded.ids.tolist() == [
        BOS, SH, USER, EH, NN, WHAT, SP, IS, SP, TWO, PLUS, TWO, QUESTION, EOT,
        SH, ASSISTANT, EH, NN, FOUR, EOT,
        SH, USER, EH, NN, THANKS, DOT, EOT,
        SH, ASSISTANT, EH, NN, YOU, SP, ARE, SP, WELCOME, DOT, EOT,
    ]  # fmt: skip
    targets = _targets(encoded)
    trained = np.flatnonzero(targets != IGNORE_INDEX)
    assert trained.tolist() == [17, 18, 30, 31, 32, 33, 34, 35, 36]  # the positions before each answer token
    assert targets[trained].tolist() == [FOUR, EOT, YOU, SP, ARE, SP, WELCOME, DOT, EOT]


def test_the_prompt_completion_layout_encodes_like_messages():
    encode = dialog_encoder(word_tokenizer(), "herd")
    reference = encode(record_dialog({"messages": QA}, "f:1", "f:1"))
    for record in (
        {"prompt": QA[:3], "completion": QA[3:]},
        {"prompt": QA[:1], "completion": QA[1:]},
    ):
        encoded = encode(record_dialog(record, "f:1", "f:1"))
        assert encoded.ids.tolist() == reference.ids.tolist()
        assert encoded.loss_mask.tolist() == reference.loss_mask.tolist()
    strings = encode(record_dialog({"prompt": "What is 2+2?", "completion": "4"}, "f:1", "f:1"))
    assert strings.ids.tolist() == encode(Dialog("x", QA[:2])).ids.tolist()


BAD_LINES = [
    ('{"messages": oops}', "malformed_json"),
    ('["messages"]', "not_an_object"),
    ('{"text": "not a dialog"}', "no_messages"),
    ('{"messages": []}', "no_messages"),
    ('{"prompt": "a question without an answer"}', "no_messages"),
    ('{"messages": "hello"}', "bad_message"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}', "bad_message"),
    ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}', "unknown_role"),
    ('{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]}', "empty_content"),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "no_assistant_turn"),
    ('{"messages": [{"role": "user", "content": "nul \\u0000"}, {"role": "assistant", "content": "x"}]}', "binary"),
    ('{"group": 7, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
     "bad_message"),
]  # fmt: skip


def test_each_bad_line_is_named_with_its_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(line.encode() for line, _ in BAD_LINES) + b'\n{"messages": "\xff"}\n')
    errors: list[BadInputError] = []
    assert list(iter_dialogs(str(path), on_bad_input=errors.append)) == []
    assert [e.reason for e in errors] == [reason for _, reason in BAD_LINES] + ["not_utf8"]
    assert [e.location for e in errors] == [f"{path}:{n}" for n in range(1, len(BAD_LINES) + 2)]
    assert {e.reason for e in errors} <= set(BAD_INPUT_REASONS)
    with pytest.raises(BadInputError, match=f"{path}:1: malformed JSON"):
        list(iter_dialogs(str(path)))


def test_stdlib_sft_options_parse_like_passkey():
    assert sft_options("stdlib:sft") == {}
    assert sft_options("stdlib:sft?seed=1&max_per_module=3&system=Be+terse.") == {
        "seed": 1, "max_per_module": 3, "system": "Be terse.",
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        sft_options("stdlib:sft?colour=red")
    with pytest.raises(ValueError, match="seed='x' must be an integer"):
        sft_options("stdlib:sft?seed=x")


# --- chat templates: herd's and the tokenizer's own ---------------------------------------------

# Like Meta's Llama 3.1 Instruct template: a system block with a knowledge-cutoff preamble comes
# first whether or not the dialog has a system message.
LLAMA31_LIKE_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + (date_string if date_string is defined else '26 Jul 2024') + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
ANSWERS = "4<|eot_id|>You are welcome.<|eot_id|>"


def _with_template(tokenizer: Tokenizer, folder: Path, template: str | None) -> Path:
    tokenizer.save(folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template")
    if template is not None:
        config["chat_template"] = template
    config_file.write_text(json.dumps(config))
    return folder


def _hf_ids(folder: Path, messages) -> list[int]:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(folder)
    return list(hf.apply_chat_template(messages, tokenize=True, return_dict=False))


def _masked_text(tokenizer, encoded) -> str:
    return tokenizer.decode(encoded.ids[encoded.loss_mask].tolist())


def test_herd_ids_equal_apply_chat_template_with_herds_template(tiny_tokenizer, tmp_path):
    folder = _with_template(tiny_tokenizer, tmp_path / "herd", LLAMA3_CHAT_TEMPLATE)
    messages = [{"role": "system", "content": "Be terse."}, *QA]
    encoded = dialog_encoder(Tokenizer.load(folder), "herd")(Dialog("d", messages))
    assert encoded.ids.tolist() == _hf_ids(folder, messages)
    assert _masked_text(tiny_tokenizer, encoded) == ANSWERS


def test_tokenizer_template_ids_equal_apply_chat_template_and_mask_the_answers(tiny_tokenizer, tmp_path):
    folder = _with_template(tiny_tokenizer, tmp_path / "llama31", LLAMA31_LIKE_TEMPLATE)
    tokenizer = Tokenizer.load(folder)
    for messages in (QA, [{"role": "system", "content": "Be terse."}, *QA]):
        encoded = dialog_encoder(tokenizer, "tokenizer")(Dialog("d", messages))
        assert encoded.ids.tolist() == _hf_ids(folder, messages)
        assert "Cutting Knowledge Date: December 2023" in tiny_tokenizer.decode(encoded.ids.tolist())
        assert _masked_text(tiny_tokenizer, encoded) == ANSWERS
        herd = dialog_encoder(tokenizer, "herd")(Dialog("d", messages))
        assert herd.ids.tolist() != encoded.ids.tolist()  # the preamble: the two formats differ
        assert _masked_text(tiny_tokenizer, herd) == ANSWERS


def test_a_template_that_changes_earlier_turns_is_refused(tiny_tokenizer, tmp_path):
    ends_with_eos = LLAMA3_CHAT_TEMPLATE + "{% if not add_generation_prompt %}{{ eos_token }}{% endif %}"
    tokenizer = Tokenizer.load(_with_template(tiny_tokenizer, tmp_path / "eos", ends_with_eos))
    with pytest.raises(
        PrepareError, match="chat_template=tokenizer: .* other than a prefix of the whole dialog"
    ):
        dialog_encoder(tokenizer, "tokenizer")(Dialog("d", QA))
    bare = Tokenizer.load(_with_template(tiny_tokenizer, tmp_path / "none", None))
    with pytest.raises(PrepareError, match="has no chat template .*use chat_template=herd"):
        dialog_encoder(bare, "tokenizer")


def test_a_dialog_the_template_cannot_place_is_a_bad_input(tiny_tokenizer, tmp_path):
    tokenizer = Tokenizer.load(_with_template(tiny_tokenizer, tmp_path / "t", LLAMA31_LIKE_TEMPLATE))
    with pytest.raises(BadInputError, match="cannot start with an assistant message") as caught:
        dialog_encoder(tokenizer, "tokenizer")(Dialog("d", QA[1:]))
    assert caught.value.reason == "template_error"


# --- prepare end to end ---------------------------------------------------------------------------


def _config(out, sources, **overrides):
    cfg = OmegaConf.load(repo_root() / "configs" / "prepare.yaml")
    cfg.pop("hydra")
    cfg.merge_with({"output_dir": str(out), "seq_len": 39, "val_fraction": 0.0, "num_proc": 1, "progress": False,
                    "shards": {"max_rows": 64, "min_count": 1}, **overrides})  # fmt: skip
    cfg.sources = sources
    return cfg


def _jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


THREE = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},  # 13 tokens
    {"messages": QA[:2]},  # 20 tokens
    {"prompt": "Thanks.", "completion": "You are welcome."},  # 19 tokens
]


def _stored_rows(folder: Path, source: str, split: str = "train"):
    """(tokens, document_ids, loss_mask) of every stored row of a split, in row order."""
    manifest = json.loads((folder / "manifest.json").read_text())
    rows = []
    for shard in manifest["sources"][source]["splits"][split]["shards"]:
        with tarfile.open(folder / shard["path"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted({name.split(".")[0] for name in members}):
            rows.append(tuple(np.load(io.BytesIO(members[f"{key}.{part}.npy"]), allow_pickle=False)
                              for part in ("tokens", "document_ids", "loss_mask")))  # fmt: skip
    return rows


def test_prepared_dialogs_read_back_into_batches_with_hand_computed_targets(words, tmp_path):
    data = _jsonl(tmp_path / "in" / "three.jsonl", THREE)
    out = prepare(_config(tmp_path / "out", {"chat": {"input": str(data), "kind": "dialog"}},
                          tokenizer={"path": str(words)}))  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["sources"]["chat"]
    assert (entry["kind"], entry["layout"]["members"], entry["layout"]["packing"]) == (
        "dialog", ["tokens", "document_ids", "loss_mask"], "whole",
    )  # fmt: skip
    assert (entry["documents"], entry["tokens"], entry["trained_tokens"]) == (3, 52, 11)
    assert entry["splits"]["train"]["rows"] == 2 and entry["splits"]["train"]["padding_tokens"] == 28
    dm = PackedDataModule(str(out), seq_len=39, batch_size=2, num_workers=0, shuffle_buffer=1)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"tokens", "document_ids", "targets"} and batch["tokens"].shape == (2, 39)
    # row 0: dialogs 1 and 2 first-fit (13 + 20 tokens), then 7 padding; row 1: dialog 3 (19) + 21 padding
    row0 = [BOS, SH, USER, EH, NN, HI, EOT, SH, ASSISTANT, EH, NN, HELLO, EOT,
            BOS, SH, USER, EH, NN, WHAT, SP, IS, SP, TWO, PLUS, TWO, QUESTION, EOT, SH, ASSISTANT, EH, NN, FOUR, EOT,
            *[EOS] * 6]  # fmt: skip
    row1 = [BOS, SH, USER, EH, NN, THANKS, DOT, EOT, SH, ASSISTANT, EH, NN, YOU, SP, ARE, SP, WELCOME, DOT, EOT,
            *[EOS] * 20]  # fmt: skip
    targets0, targets1 = [IGNORE_INDEX] * 39, [IGNORE_INDEX] * 39
    targets0[10:12] = [HELLO, EOT]
    targets0[30:32] = [FOUR, EOT]
    targets1[11:18] = [YOU, SP, ARE, SP, WELCOME, DOT, EOT]
    assert batch["tokens"].tolist() == [row0, row1]
    assert batch["targets"].tolist() == [targets0, targets1]
    assert batch["document_ids"].tolist() == [[0] * 13 + [1] * 20 + [2] * 6, [0] * 19 + [1] * 20]


def test_dialog_and_text_sources_mix_in_one_datamodule(words, tmp_path):
    data = _jsonl(tmp_path / "in" / "three.jsonl", THREE * 4)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("Hi what is 2 ? " * 40)
    out = prepare(_config(tmp_path / "out", {"chat": {"input": str(data), "kind": "dialog"},
                                             "notes": {"input": str(tmp_path / "notes")}},
                          tokenizer={"path": str(words)}))  # fmt: skip
    dm = PackedDataModule(str(out), {"chat": {"weight": 1.0}, "notes": {"weight": 1.0}}, seq_len=39,
                          batch_size=4, num_workers=0, shuffle_buffer=1)  # fmt: skip
    picks = [pick for pick, _ in zip(dm.train_dataloader().dataset.mixed_samples(), range(40), strict=False)]
    assert {index for index, _ in picks} == {0, 1}
    text_targets = set()
    for index, sample in picks:
        predicted = sample.targets != IGNORE_INDEX
        assert (
            sample.targets[:-1][predicted[:-1]] == sample.tokens[1:][predicted[:-1]]
        ).all()  # the next token
        if index == 0:  # dialog rows: only the answers, never a prompt, never padding
            assert set(sample.targets[predicted].tolist()) <= {HELLO, FOUR, YOU, SP, ARE, WELCOME, DOT, EOT}
            assert predicted.sum() > 0
        else:
            text_targets |= set(sample.targets[predicted].tolist())
    assert {HI, IS, TWO, QUESTION, EOS} <= text_targets  # text: every token of a document is a target
    with pytest.raises(ValueError, match="data.seq_len=20, but source 'chat' holds dialogs packed whole into rows "
                                         "of seq_len=39.*set data.seq_len=39"):  # fmt: skip
        PackedDataModule(str(out), seq_len=20, num_workers=0)
    with pytest.raises(ValueError, match="data.seq_len=64, but source 'chat'"):
        dm.set_seq_len(64)
    assert dm.seq_len == 39
    PackedDataModule(str(out), {"notes": {}}, seq_len=20, num_workers=0)  # text alone: any length


def test_the_layouts_give_identical_shards(words, tmp_path):
    messages = [{"messages": r["messages"]} if "messages" in r else
                {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
                for r in THREE]  # fmt: skip
    outputs = []
    for name, records in (("a", THREE), ("b", messages)):
        data = _jsonl(tmp_path / name / "d.jsonl", records)
        out = prepare(_config(tmp_path / f"out-{name}", {"chat": {"input": str(data), "kind": "dialog"}},
                              tokenizer={"path": str(words)}))  # fmt: skip
        outputs.append((out / "chat" / "train-000000.tar").read_bytes())
    assert outputs[0] == outputs[1]


def _many(count: int, groups: int | None = None, rng_seed: int = 0):
    """Dialogs of varied length: 'Hi' x n asked, 'Hello' x m answered; optionally in groups."""
    rng = np.random.default_rng(rng_seed)
    records = []
    for index in range(count):
        question, answer = (
            " ".join(["Hi"] * int(rng.integers(1, 12))),
            " ".join(["Hello"] * int(rng.integers(1, 9))),
        )
        record = {"messages": [{"role": "user", "content": f"{question} {index}"},
                               {"role": "assistant", "content": answer}]}  # fmt: skip
        if groups:
            record["group"] = f"module{index % groups}"
        records.append(record)
    return records


def _segments(rows):
    """Each stored dialog as (ids, mask) tuples, and the padding seen."""
    found, padding = [], []
    for tokens, docs, mask in rows:
        for doc in np.unique(docs):
            where = docs == doc
            if doc < 0:
                padding.append((tokens[where], mask[where]))
                assert where[np.argmax(where) :].all()  # padding is the row's tail
            else:
                span = np.flatnonzero(where)
                assert (np.diff(span) == 1).all()  # a dialog is contiguous in its row
                found.append((tuple(tokens[where].tolist()), tuple(mask[where].tolist())))
    return found, padding


@pytest.mark.parametrize("too_long", ["drop", "truncate"])
def test_every_dialog_is_packed_once_whole_and_too_long_ones_are_counted(words, tmp_path, too_long):
    records = _many(60)
    data = _jsonl(tmp_path / "in" / "many.jsonl", records)
    out = prepare(_config(tmp_path / "out", {"chat": {"input": str(data), "kind": "dialog", "too_long": too_long}},
                          tokenizer={"path": str(words)}, seq_len=29))  # fmt: skip
    encode = dialog_encoder(Tokenizer.load(words), "herd")
    expected = [encode(record_dialog(r, "x", f"many.jsonl:{n}")) for n, r in enumerate(records, start=1)]
    fits = [(tuple(e.ids.tolist()), tuple(e.loss_mask.tolist())) for e in expected if len(e.ids) <= 30]
    long = [e for e in expected if len(e.ids) > 30]
    cut = [
        (tuple(e.ids[:30].tolist()), tuple(e.loss_mask[:30].tolist())) for e in long if e.loss_mask[:30].any()
    ]
    assert long and (too_long == "drop" or cut)
    found, padding = _segments(_stored_rows(out, "chat"))
    assert sorted(found) == sorted(fits + (cut if too_long == "truncate" else []))  # each once, whole
    for tokens, mask in padding:
        assert (tokens == EOS).all() and not mask.any()  # padding is never trained on
    entry = json.loads((out / "manifest.json").read_text())["sources"]["chat"]
    dropped = len(long) - (len(cut) if too_long == "truncate" else 0)
    assert entry["too_long"] == {"policy": too_long, "dropped": dropped,
                                 "truncated": len(cut) if too_long == "truncate" else 0}  # fmt: skip
    assert entry["documents"] == len(found)


def test_groups_are_held_out_whole(tiny_tokenizer, tmp_path):
    records = _many(200, groups=20)
    data = _jsonl(tmp_path / "in" / "grouped.jsonl", records)
    folder = tiny_tokenizer.save(tmp_path / "tok")
    out = prepare(_config(tmp_path / "out", {"chat": {"input": str(data), "kind": "dialog"}},
                          tokenizer={"path": str(folder)}, val_fraction=0.3, seq_len=255))  # fmt: skip
    encode = dialog_encoder(tiny_tokenizer, "herd")
    group_of = {tuple(encode(record_dialog(r, "x", "x")).ids.tolist()): r["group"] for r in records}
    held_out = {g for g in {r["group"] for r in records} if assign_split(g, 0.3) == "val"}
    assert 0 < len(held_out) < 20 and len(group_of) == len(records)  # every dialog encodes differently
    for split in ("train", "val"):
        found, _ = _segments(_stored_rows(out, "chat", split))
        groups = {group_of[ids] for ids, _ in found}
        assert groups == (held_out if split == "val" else {r["group"] for r in records} - held_out)
        assert len(found) == sum(1 for r in records if (r["group"] in held_out) == (split == "val"))
    entry = json.loads((out / "manifest.json").read_text())["sources"]["chat"]
    assert entry["groups"] == {"train": 20 - len(held_out), "val": len(held_out)}


def test_bad_lines_are_counted_skips_up_to_the_limit(words, tmp_path, caplog):
    path = tmp_path / "in" / "mixed.jsonl"
    good = [json.dumps(r) for r in _many(150)]
    path.parent.mkdir()
    path.write_text("\n".join(good[:50] + [line for line, _ in BAD_LINES] + good[50:]) + "\n")
    sources = {"chat": {"input": str(path), "kind": "dialog"}}
    with caplog.at_level(logging.WARNING, logger="herd.data.kinds"):
        out = prepare(_config(tmp_path / "out", sources, tokenizer={"path": str(words)}, seq_len=63))
    entry = json.loads((out / "manifest.json").read_text())["sources"]["chat"]
    expected: dict[str, int] = {}
    for _, reason in BAD_LINES:
        expected[reason] = expected.get(reason, 0) + 1
    assert entry["skipped"] == dict(sorted(expected.items()))
    assert entry["documents"] == 150
    assert f"source chat: skipped a bad input: {path}:51: malformed JSON" in caplog.text
    assert f"{path}:52: expected a JSON object" in caplog.text
    with pytest.raises(PrepareError, match=r"source chat: 12 of 162 inputs \(7.4%\) were bad \(bad_message: 3, "
                                           r".*\), more than max_bad_fraction=0.05 allows"):  # fmt: skip
        prepare(_config(tmp_path / "fail", sources, tokenizer={"path": str(words)}, max_bad_fraction=0.05))
    assert not (tmp_path / "fail").exists()
    with pytest.raises(BadInputError, match=f"{path}:51: malformed JSON"):
        prepare(_config(tmp_path / "fail", {"chat": {**sources["chat"], "on_bad_input": "error"}},
                        tokenizer={"path": str(words)}))  # fmt: skip


def test_a_source_of_nothing_but_bad_lines_fails(words, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(line for line, _ in BAD_LINES) + "\n")
    with pytest.raises(PrepareError, match="source chat: every input was skipped as bad"):
        prepare(_config(tmp_path / "out", {"chat": {"input": str(data), "kind": "dialog"}},
                        tokenizer={"path": str(words)}, max_bad_fraction=1.0))  # fmt: skip


def test_the_tokenizer_template_through_prepare(tiny_tokenizer, tmp_path):
    folder = _with_template(tiny_tokenizer, tmp_path / "llama31", LLAMA31_LIKE_TEMPLATE)
    data = _jsonl(tmp_path / "in" / "three.jsonl", THREE)
    out = prepare(_config(tmp_path / "out", {"chat": {"input": str(data), "kind": "dialog"}},
                          tokenizer={"path": str(folder)}, chat_template="tokenizer", seq_len=255))  # fmt: skip
    found, _ = _segments(_stored_rows(out, "chat"))
    dialogs = [record_dialog(r, "x", "x").messages for r in THREE]
    assert sorted(ids for ids, _ in found) == sorted(tuple(_hf_ids(folder, messages)) for messages in dialogs)
    masked = sorted(
        tiny_tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m]) for ids, mask in found
    )
    assert masked == sorted(["Hello<|eot_id|>", "4<|eot_id|>", "You are welcome.<|eot_id|>"])
    entry = json.loads((out / "manifest.json").read_text())["sources"]["chat"]
    assert entry["chat_template"] == "tokenizer"


def test_stdlib_sft_is_a_dialog_source_split_by_module(tiny_tokenizer, tmp_path):
    from herd.data.embedded.sft import stdlib_sft

    folder = tiny_tokenizer.save(tmp_path / "tok")
    out = prepare(_config(tmp_path / "out", {"sft": {"input": "stdlib:sft?max_per_module=1"}},
                          tokenizer={"path": str(folder)}, val_fraction=0.2, seq_len=511))  # fmt: skip
    entry = json.loads((out / "manifest.json").read_text())["sources"]["sft"]
    assert entry["kind"] == "dialog" and entry["skipped"] == {}
    encode = dialog_encoder(tiny_tokenizer)
    kept = [d for d in stdlib_sft(max_per_module=1) if len(encode(Dialog(d.id, d.messages)).ids) <= 512]
    modules = {d.group for d in kept}
    held_out = {m for m in modules if assign_split(m, 0.2) == "val"}
    assert 0 < len(held_out) < len(modules)
    assert entry["groups"] == {"train": len(modules - held_out), "val": len(held_out)}
    assert entry["splits"]["val"]["documents"] == sum(1 for d in kept if d.group in held_out)
    assert entry["documents"] == len(kept)


@pytest.mark.parametrize(
    ("source", "overrides", "message"),
    [
        ({"kind": "pictures"}, {}, "unknown kind 'pictures'"),
        (
            {"kind": "dialog", "too_long": "wrap"},
            {},
            "sources.chat.too_long must be one of \\('drop', 'truncate'\\)",
        ),
        ({"kind": "dialog"}, {"chat_template": "chatml"}, "sources.chat.chat_template must be one of"),
        (
            {"kind": "dialog", "text_field": "body"},
            {},
            "sources.chat: unknown key\\(s\\) \\['text_field'\\] for a dialog",
        ),
        (
            {"kind": "dialog"},
            {"max_bad_fraction": 2},
            "max_bad_fraction \\(of source chat\\) must be a number in",
        ),
        ({"kind": "dialog", "on_bad_input": "ignore"}, {}, "on_bad_input must be one of"),
    ],
)
def test_dialog_config_values_are_checked_first(tmp_path, source, overrides, message):
    with pytest.raises(PrepareError, match=message):
        prepare(
            _config(
                tmp_path / "out", {"chat": {"input": str(tmp_path / "missing.jsonl"), **source}}, **overrides
            )
        )
    assert not (tmp_path / "out").exists()

"""Tokenizer: training, the Llama 3 special-token layout, save/load, transformers, real Llama 3 dirs."""

from __future__ import annotations

import json

import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from helpers.synthetic import tiny_corpus
from herd.data.tokenizer import Tokenizer, llama3_special_tokens, train_tokenizer

TEXT = "def read(path):\n    return open(path).read()  # naïve ünïcode, 12345 <|eot_id|>"


def test_special_tokens_follow_llama3_order(tiny_tokenizer):
    n = tiny_tokenizer.vocab_size - 256
    assert n == 384
    ids = tiny_tokenizer.special_ids
    assert (ids["begin_of_text"], ids["end_of_text"]) == (n, n + 1)
    assert (ids["start_header_id"], ids["end_header_id"]) == (n + 6, n + 7)
    assert (ids["eom_id"], ids["eot_id"], ids["python_tag"]) == (n + 8, n + 9, n + 10)
    backend = tiny_tokenizer.backend
    assert backend.id_to_token(n + 2) == "<|reserved_special_token_0|>"
    assert backend.id_to_token(n + 3) == "<|reserved_special_token_1|>"
    assert backend.id_to_token(n + 5) == "<|reserved_special_token_2|>"
    assert backend.id_to_token(n + 11) == "<|reserved_special_token_3|>"
    assert backend.id_to_token(n + 255) == "<|reserved_special_token_247|>"
    assert len(set(llama3_special_tokens())) == 256


def test_round_trip_through_a_saved_folder(tiny_tokenizer, tmp_path):
    folder = tiny_tokenizer.save(tmp_path / "tok")
    loaded = Tokenizer.load(folder)
    assert loaded.encode(TEXT) == tiny_tokenizer.encode(TEXT)
    assert loaded.decode(loaded.encode(TEXT)) == TEXT
    assert loaded.fingerprint == tiny_tokenizer.fingerprint
    assert loaded.vocab_size == 640
    assert loaded.special_ids == tiny_tokenizer.special_ids


def test_special_strings_in_text_are_not_control_tokens(tiny_tokenizer):
    ids = tiny_tokenizer.encode("hello <|eot_id|>")
    assert tiny_tokenizer.special_id("eot_id") not in ids
    assert tiny_tokenizer.decode(ids) == "hello <|eot_id|>"


def test_fingerprint_ignores_layout_but_not_content(tiny_tokenizer, tmp_path):
    folder = tiny_tokenizer.save(tmp_path / "tok")
    data = json.loads((folder / "tokenizer.json").read_text())
    (folder / "tokenizer.json").write_text(json.dumps(data, indent=4, sort_keys=True))
    assert Tokenizer.load(folder).fingerprint == tiny_tokenizer.fingerprint
    data["added_tokens"][-1]["content"] = "<|something_else|>"
    (folder / "tokenizer.json").write_text(json.dumps(data))
    assert Tokenizer.load(folder).fingerprint != tiny_tokenizer.fingerprint


def test_training_is_deterministic():
    corpus = tiny_corpus(100, seed=3)
    assert train_tokenizer(corpus, 600).fingerprint == train_tokenizer(corpus, 600).fingerprint


def test_transformers_loads_the_folder_with_bos_eos(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    folder = tiny_tokenizer.save(tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(folder)
    assert hf.bos_token_id == tiny_tokenizer.bos_id
    assert hf.eos_token_id == tiny_tokenizer.eos_id
    assert len(hf) == 640
    assert hf("def read")["input_ids"] == [tiny_tokenizer.bos_id, *tiny_tokenizer.encode("def read")]


def test_too_small_vocab_or_corpus_is_refused():
    with pytest.raises(ValueError, match="at least 512"):
        train_tokenizer(["abc"], vocab_size=300)
    with pytest.raises(ValueError, match="only supports"):
        train_tokenizer(["ab ab ab"], vocab_size=4096)


def test_missing_tokenizer_path_names_itself(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        Tokenizer.load(tmp_path / "nowhere")


def test_a_tokenizer_without_llama3_specials_loads_with_its_own_roles(tmp_path):
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel()
    (tmp_path / "tokenizer.json").write_text(backend.to_str())
    tokenizer = Tokenizer.load(tmp_path)
    assert not tokenizer.llama3_format and tokenizer.bos_id is None and tokenizer.chat_template is None
    with pytest.raises(ValueError, match="names no eos_token .*add \"eos_token\" to its tokenizer_config.json"):
        _ = tokenizer.eos_id


def _fake_llama3_folder(folder):
    """A Llama 3 style folder: 128,000 BPE ids, then the 256 specials at 128000..128255."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(sorted(alphabet))}
    vocab.update({f"filler{i}": i for i in range(len(vocab), 128000)})
    backend = BackendTokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in llama3_special_tokens()]
    )
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_loads_a_llama3_style_folder_with_llama3_ids(tmp_path):
    tok = Tokenizer.load(_fake_llama3_folder(tmp_path / "llama3"))
    assert tok.vocab_size == 128256
    assert (tok.bos_id, tok.eos_id) == (128000, 128001)
    assert (tok.special_id("start_header_id"), tok.special_id("end_header_id")) == (128006, 128007)
    assert (tok.special_id("eom_id"), tok.special_id("eot_id"), tok.special_id("python_tag")) == (
        128008,
        128009,
        128010,
    )
    assert tok.backend.id_to_token(128255) == "<|reserved_special_token_247|>"
    assert tok.decode(tok.encode("hello world")) == "hello world"
    saved = Tokenizer.load(tok.save(tmp_path / "copy"))
    assert saved.fingerprint == tok.fingerprint
    assert saved.config["eos_token"] == "<|eot_id|>"  # the user's config is kept, not replaced

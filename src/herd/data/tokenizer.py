"""Byte-level BPE tokenizers in the Llama 3 layout, on top of Hugging Face ``tokenizers``.

A herd tokenizer is a folder with a ``tokenizer.json`` (the ``tokenizers`` format) and a
``tokenizer_config.json`` (so that ``transformers.AutoTokenizer.from_pretrained`` loads it with
bos/eos set). Real Llama 3 tokenizer folders, as published with the models, are read unchanged.

Layout: ``n`` BPE ids first, then Llama 3.1's 256 special tokens in Llama's order, so that with
``n = 128000`` the ids are exactly Llama 3's::

    n+0 <|begin_of_text|>   n+1 <|end_of_text|>    n+2 <|reserved_special_token_0|>
    n+3 <|reserved_special_token_1|>   n+4 <|finetune_right_pad_id|>
    n+5 <|reserved_special_token_2|>   n+6 <|start_header_id|>   n+7 <|end_header_id|>
    n+8 <|eom_id|>   n+9 <|eot_id|>   n+10 <|python_tag|>
    n+11 .. n+255 <|reserved_special_token_3|> .. <|reserved_special_token_247|>

Text is always encoded with special-token strings treated as plain text (as Meta's reference
tokenizer does), so a document that contains the characters ``<|eot_id|>`` cannot inject a
control token. Special tokens enter a sequence only by id (see :mod:`herd.data.chat`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers

NUM_SPECIAL_TOKENS = 256

# The Llama 3 dialog format (herd.data.chat) as a Jinja chat template, saved in herd's
# tokenizer_config.json so that ``transformers``' ``apply_chat_template`` agrees with
# :func:`herd.data.chat.render_dialog`.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message.get('python_tag', false) %}{{ '<|python_tag|>' }}{% endif %}"
    "{{ message['content'] | trim }}"
    "{% if message.get('eom', message.get('python_tag', false)) %}{{ '<|eom_id|>' }}"
    "{% else %}{{ '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Llama 3.1's named special tokens, in id order from n+0; reserved tokens fill the rest.
_NAMED_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)

# Names by which herd code asks for special tokens; the first five are required of any tokenizer.
SPECIAL_TOKEN_NAMES = {
    "begin_of_text": "<|begin_of_text|>",
    "end_of_text": "<|end_of_text|>",
    "start_header_id": "<|start_header_id|>",
    "end_header_id": "<|end_header_id|>",
    "eot_id": "<|eot_id|>",
    "eom_id": "<|eom_id|>",
    "python_tag": "<|python_tag|>",
    "finetune_right_pad_id": "<|finetune_right_pad_id|>",
    # herd's speech adapter: the reserved tokens around a clip's embeddings (herd.data.kinds.audio)
    "speech_start": "<|reserved_special_token_10|>",
    "speech_end": "<|reserved_special_token_11|>",
}
_REQUIRED = ("begin_of_text", "end_of_text", "start_header_id", "end_header_id", "eot_id")

# The pre-tokenizer split of Llama 3's tokenizer.json (tiktoken's cl100k pattern).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"


def llama3_special_tokens() -> list[str]:
    """The 256 special-token strings in Llama 3.1's order (ids ``n+0`` .. ``n+255``)."""
    n_reserved = NUM_SPECIAL_TOKENS - len(_NAMED_SPECIALS)
    return list(_NAMED_SPECIALS) + [f"<|reserved_special_token_{3 + i}|>" for i in range(n_reserved)]


class Tokenizer:
    """A loaded tokenizer: encode/decode text, special-token ids by name, fingerprint.

    Build one with :func:`train_tokenizer` or :meth:`Tokenizer.load`. ``backend`` is the
    ``tokenizers.Tokenizer``; ``config`` the content of tokenizer_config.json.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        source: str = "<memory>",
        config: dict[str, Any] | None = None,
        json_text: str | None = None,
    ) -> None:
        self._json = json_text if json_text is not None else backend.to_str()
        self.backend = backend
        self.backend.encode_special_tokens = True  # special strings in text stay text
        self.source = source
        self.config = config or {}
        self.special_ids = _special_ids(backend, source)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a tokenizer folder (``tokenizer.json`` [+ ``tokenizer_config.json``]) or a tokenizer.json file."""
        path = Path(path).expanduser()
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"tokenizer not found: {file} does not exist. Pass the folder of a herd or Llama 3 "
                f"tokenizer (it holds {TOKENIZER_FILE}), or leave the tokenizer path empty to train one."
            )
        config_file = file.parent / CONFIG_FILE
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        json_text = file.read_text(encoding="utf-8")
        return cls(tokenizers.Tokenizer.from_str(json_text), str(file), config, json_text)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``; returns the folder."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TOKENIZER_FILE).write_text(self._json, encoding="utf-8")
        config = self.config or _default_config()
        text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        (directory / CONFIG_FILE).write_text(text, encoding="utf-8")
        return directory

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding rows must cover it)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of ``tokenizer.json`` (key order and whitespace ignored)."""
        canonical = json.dumps(
            json.loads(self._json), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def bos_id(self) -> int:
        """Id of ``<|begin_of_text|>``."""
        return self.special_ids["begin_of_text"]

    @property
    def eos_id(self) -> int:
        """Id of ``<|end_of_text|>`` (ends a pretraining document)."""
        return self.special_ids["end_of_text"]

    def special_id(self, name: str) -> int:
        """Id of a special token by herd name (``"eot_id"``) or by string (``"<|eot_id|>"``)."""
        token = SPECIAL_TOKEN_NAMES.get(name, name)
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"tokenizer {self.source} has no special token {token!r}")
        return token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without bos/eos; special-token strings in ``text`` are plain text."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` for many texts at once (parallel inside ``tokenizers``)."""
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens are written out as their strings."""
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        """The ``tokenizer.json`` content (e.g. to rebuild the tokenizer in another process)."""
        return self._json

    def to_transformers(self):
        """This tokenizer as a ``transformers`` fast tokenizer, bos/eos set from the config."""
        from transformers import PreTrainedTokenizerFast

        config = self.config or _default_config()
        backend = tokenizers.Tokenizer.from_str(self._json)
        keys = ("bos_token", "eos_token", "pad_token", "chat_template", "model_max_length")
        kwargs = {key: config[key] for key in keys if isinstance(config.get(key), (str, int))}
        return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE so that BPE ids + 256 Llama 3 special tokens = ``vocab_size``.

    The pre-tokenizer is Llama 3's (regex split + byte level), so any text encodes without
    unknown tokens. Training is deterministic for a given corpus order.
    """
    n_bpe = vocab_size - NUM_SPECIAL_TOKENS
    if n_bpe < 256:
        raise ValueError(
            f"tokenizer vocab_size={vocab_size} is too small: it must hold 256 byte tokens plus "
            f"{NUM_SPECIAL_TOKENS} special tokens, so use at least {256 + NUM_SPECIAL_TOKENS}."
        )
    backend = _empty_byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    trained = backend.get_vocab_size()
    if trained != n_bpe:
        raise ValueError(
            f"the training corpus only supports {trained} BPE tokens, not the {n_bpe} that "
            f"vocab_size={vocab_size} asks for: use more text or a vocab_size of at most "
            f"{trained + NUM_SPECIAL_TOKENS}."
        )
    specials = llama3_special_tokens()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.post_processor = _bos_post_processor(n_bpe)
    return Tokenizer(backend, config=_default_config())


def _empty_byte_level_bpe() -> tokenizers.Tokenizer:
    """An untrained BPE with Llama 3's pre-tokenizer and a byte-level decoder."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _bos_post_processor(bos_id: int) -> processors.PostProcessor:
    """Llama 3's post-processor: ``transformers`` callers get ``<|begin_of_text|>`` prepended."""
    bos = "<|begin_of_text|>"
    return processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)]
            ),
        ]
    )


def _special_ids(backend: tokenizers.Tokenizer, source: str) -> dict[str, int]:
    """Ids of the named special tokens present; raises if a required one is missing."""
    ids = {name: backend.token_to_id(token) for name, token in SPECIAL_TOKEN_NAMES.items()}
    missing = [SPECIAL_TOKEN_NAMES[name] for name in _REQUIRED if ids[name] is None]
    if missing:
        raise ValueError(
            f"tokenizer {source} lacks the Llama 3 special tokens {missing}: herd needs a Llama 3 "
            "style tokenizer (a real Llama 3 tokenizer folder, or one trained by herd.prepare)."
        )
    return {name: token_id for name, token_id in ids.items() if token_id is not None}


def _default_config() -> dict[str, Any]:
    """tokenizer_config.json for herd-trained tokenizers (base model: eos = end_of_text)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "pad_token": "<|finetune_right_pad_id|>",
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "chat_template": LLAMA3_CHAT_TEMPLATE,
    }

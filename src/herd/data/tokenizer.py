"""Tokenizers on top of Hugging Face ``tokenizers``: herd's own (Llama 3 layout) and any fast-tokenizer folder.

A tokenizer is a folder with a ``tokenizer.json`` (the ``tokenizers`` format), a
``tokenizer_config.json`` (bos/eos/pad and usually the chat template), and optionally
``chat_template.jinja``, ``special_tokens_map.json`` and ``generation_config.json``. Any Hugging
Face fast-tokenizer folder is read as it comes (Llama 2/3, SmolLM, TinyLlama, Mistral-style,
...): the special roles are read from those files, never assumed. :meth:`Tokenizer.save`
writes the files back byte for byte. A folder that holds only a SentencePiece
``tokenizer.model`` is converted through ``transformers`` when it can be, else refused with the
command that converts it.

herd's own tokenizers (:func:`train_tokenizer`) use Llama 3's layout:

Layout: ``n`` BPE ids first, then Llama 3.1's 256 special tokens in Llama's order, so that with
``n = 128000`` the ids are exactly Llama 3's::

    n+0 <|begin_of_text|>   n+1 <|end_of_text|>    n+2 <|reserved_special_token_0|>
    n+3 <|reserved_special_token_1|>   n+4 <|finetune_right_pad_id|>
    n+5 <|reserved_special_token_2|>   n+6 <|start_header_id|>   n+7 <|end_header_id|>
    n+8 <|eom_id|>   n+9 <|eot_id|>   n+10 <|python_tag|>
    n+11 .. n+255 <|reserved_special_token_3|> .. <|reserved_special_token_247|>

Text is always encoded with special-token strings treated as plain text (as Meta's reference
tokenizer does), so a document that contains the characters ``<|eot_id|>`` cannot inject a
control token. Special tokens enter a sequence only by id, or from a chat template's own text
(see :mod:`herd.data.chat`).
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

# Names by which herd code asks for special tokens; a tokenizer with the first five speaks Llama 3's
# chat format (herd's default), and any other tokenizer uses its own chat template.
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
TEMPLATE_FILE = "chat_template.jinja"
SENTENCEPIECE_FILE = "tokenizer.model"
GENERATION_CONFIG_FILE = "generation_config.json"
# The files of a tokenizer folder that travel with it, unchanged (exports, prepared data).
TOKENIZER_FILES = (TOKENIZER_FILE, CONFIG_FILE, TEMPLATE_FILE, "special_tokens_map.json")


class TokenizerError(ValueError):
    """A tokenizer folder or file that herd cannot use; the message names the file and the fix."""


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
        files: dict[str, bytes] | None = None,
        generation_config: dict[str, Any] | None = None,
    ) -> None:
        self._json = json_text if json_text is not None else backend.to_str()
        self.backend = backend
        self.backend.encode_special_tokens = True  # special strings in text stay text
        self.source = source
        self.config = config or {}
        self.files = dict(files or {})  # the folder's files as read (name -> bytes), written back unchanged
        self.generation_config = generation_config or {}
        self.special_ids = _special_ids(backend)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a tokenizer folder (``tokenizer.json`` [+ ``tokenizer_config.json``, ...]) or a tokenizer.json file.

        Raises FileNotFoundError when it is missing, and :class:`TokenizerError` naming the file and
        the fix when it is unreadable.
        """
        path = Path(path).expanduser()
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if path.is_dir() and not file.is_file() and (path / SENTENCEPIECE_FILE).is_file():
            file = _convert_sentencepiece(path)
        if not file.is_file():
            raise FileNotFoundError(
                f"tokenizer not found: {file} does not exist. Pass a tokenizer folder (it holds "
                f"{TOKENIZER_FILE}: a Hugging Face fast tokenizer, or one trained by herd.prepare), or leave the "
                "tokenizer path empty to train one."
            )
        folder = file.parent
        files = {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}
        config = _json_object(folder / CONFIG_FILE, files.get(CONFIG_FILE))
        generation = folder / GENERATION_CONFIG_FILE
        generation_config = _json_object(generation, generation.read_bytes() if generation.is_file() else None)
        try:
            json_text = files.get(TOKENIZER_FILE, file.read_bytes()).decode("utf-8")
            backend = tokenizers.Tokenizer.from_str(json_text)
        except (UnicodeDecodeError, Exception) as err:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(
                f"{file} is not a valid tokenizer.json ({str(err).splitlines()[0][:200]}); restore it from the model's "
                "original files, or re-run herd.prepare to train a new tokenizer"
            ) from None
        return cls(backend, str(file), config, json_text, files, generation_config)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the tokenizer's files into ``directory`` (those it was read from, byte for byte); returns the folder."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = dict(self.files)
        files[TOKENIZER_FILE] = files.get(TOKENIZER_FILE) or self._json.encode("utf-8")
        if CONFIG_FILE not in files:
            config = self.config or _default_config()
            files[CONFIG_FILE] = (json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
        for name, data in files.items():
            (directory / name).write_bytes(data)
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
    def llama3_format(self) -> bool:
        """Whether the tokenizer has Llama 3's chat tokens (begin/end of text, headers, ``<|eot_id|>``)."""
        return all(name in self.special_ids for name in _REQUIRED)

    @property
    def bos_id(self) -> int | None:
        """Id of the token that starts a sequence: ``<|begin_of_text|>``, else the config's bos_token (may be None)."""
        if "begin_of_text" in self.special_ids:
            return self.special_ids["begin_of_text"]
        return self._config_token_id("bos_token")

    @property
    def eos_id(self) -> int:
        """Id of the token that ends a document (``<|end_of_text|>``, else the config's eos_token); pads rows too."""
        if "end_of_text" in self.special_ids:
            return self.special_ids["end_of_text"]
        token_id = self._config_token_id("eos_token")
        if token_id is None:
            raise TokenizerError(
                f"tokenizer {self.source} names no eos_token (in {CONFIG_FILE}) and has no <|end_of_text|>: herd "
                "needs a token that ends a document; add \"eos_token\" to its tokenizer_config.json"
            )
        return token_id

    @property
    def pad_id(self) -> int:
        """Id of the padding token: the config's pad_token, else :attr:`eos_id`."""
        token_id = self._config_token_id("pad_token")
        return self.eos_id if token_id is None else token_id

    @property
    def chat_template(self) -> str | None:
        """The folder's chat template: ``chat_template.jinja``, else tokenizer_config.json's ``chat_template``."""
        if TEMPLATE_FILE in self.files:
            return self.files[TEMPLATE_FILE].decode("utf-8")
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
            template = named.get("default")
        return template if isinstance(template, str) else None

    @property
    def generation_eos_ids(self) -> tuple[int, ...]:
        """The ids generation_config.json ends generation with (``eos_token_id``: an id or a list), if any."""
        value = self.generation_config.get("eos_token_id")
        values = value if isinstance(value, list) else [value]
        return tuple(int(v) for v in values if isinstance(v, int) and 0 <= v < self.vocab_size)

    def token_id(self, token: str) -> int | None:
        """Id of a token string (None when the vocabulary has no such token)."""
        return self.backend.token_to_id(token)

    def _config_token_id(self, key: str) -> int | None:
        token = self.config.get(key)
        if isinstance(token, dict):  # an AddedToken as older files store it: {"content": ..., ...}
            token = token.get("content")
        return self.backend.token_to_id(token) if isinstance(token, str) else None

    def special_id(self, name: str) -> int:
        """Id of a special token by herd name (``"eot_id"``) or by string (``"<|eot_id|>"``)."""
        token = SPECIAL_TOKEN_NAMES.get(name, name)
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"tokenizer {self.source} has no special token {token!r}")
        return token_id

    def with_bos(self, ids: Sequence[int]) -> list[int]:
        """``ids`` after the bos token, when the tokenizer has one (some, like ChatML models', have none)."""
        return list(ids) if self.bos_id is None else [self.bos_id, *ids]

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
        """This tokenizer as a ``transformers`` tokenizer (cached).

        A folder on disk loads with ``AutoTokenizer`` (its own class, template and specials, as any
        ``transformers`` user gets them); a tokenizer in memory becomes a ``PreTrainedTokenizerFast``
        with bos/eos/pad and the chat template from its config.
        """
        if getattr(self, "_transformers", None) is not None:
            return self._transformers
        folder = Path(self.source).parent
        if self.files and (folder / TOKENIZER_FILE).is_file():
            from transformers import AutoTokenizer

            self._transformers = AutoTokenizer.from_pretrained(str(folder))
            return self._transformers
        from transformers import PreTrainedTokenizerFast

        config = self.config or _default_config()
        backend = tokenizers.Tokenizer.from_str(self._json)
        keys = ("bos_token", "eos_token", "pad_token", "model_max_length")
        kwargs = {key: config[key] for key in keys if isinstance(config.get(key), (str, int))}
        self._transformers = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=self.chat_template, **kwargs)
        return self._transformers

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_transformers", None)  # rebuilt on demand in the other process
        return state


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


def _special_ids(backend: tokenizers.Tokenizer) -> dict[str, int]:
    """Ids of herd's named special tokens (:data:`SPECIAL_TOKEN_NAMES`) that the vocabulary has."""
    ids = {name: backend.token_to_id(token) for name, token in SPECIAL_TOKEN_NAMES.items()}
    return {name: token_id for name, token_id in ids.items() if token_id is not None}


def _json_object(path: Path, data: bytes | None) -> dict[str, Any]:
    """The JSON object in ``data`` (read from ``path``); {} when there is none; TokenizerError when it is not one."""
    if data is None:
        return {}
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path} is not valid JSON ({err}); restore it from the model's original files") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} must hold a JSON object, got {type(value).__name__}; restore it from the "
                             "model's original files")
    return value


def _convert_sentencepiece(folder: Path) -> Path:
    """A ``tokenizer.json`` converted (through transformers) from a folder holding only a SentencePiece model.

    The converted files go to a temporary folder; the user's folder is not written to.
    """
    command = (f"python -c \"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained('{folder}')"
               f".save_pretrained('{folder}')\"")
    try:
        import tempfile

        from transformers import AutoTokenizer

        converted = AutoTokenizer.from_pretrained(str(folder))
        if not getattr(converted, "is_fast", False):
            raise ValueError("transformers gave a slow tokenizer")
        target = Path(tempfile.mkdtemp(prefix="herd-tokenizer-"))  # the user's folder is left as it is
        converted.save_pretrained(str(target))
    except Exception as err:  # a missing sentencepiece/protobuf, an unknown tokenizer class, a damaged file
        raise TokenizerError(
            f"{folder} holds only a SentencePiece {SENTENCEPIECE_FILE}, and converting it failed "
            f"({str(err).splitlines()[0][:200] if str(err) else type(err).__name__}). Convert it once with "
            f"`pip install sentencepiece protobuf` and {command}, then point herd at the folder again"
        ) from None
    return target / TOKENIZER_FILE


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

"""Tokenizer folders in three real-world styles, built offline with the ``tokenizers`` library.

- ``chatml``: byte-level BPE with ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, no bos token,
  a ChatML template that adds a default system turn (SmolLM's layout);
- ``llama2``: SentencePiece-style BPE (``▁`` metaspace) with ``<unk>``, ``<s>``, ``</s>`` and the
  ``[INST]`` template of Llama 2 chat models;
- ``llama3``: a tokenizer trained by herd (Llama 3's 256 special tokens and chat format).

Each is saved as a folder that ``transformers.AutoTokenizer.from_pretrained`` loads.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

STYLES = ("chatml", "llama2", "llama3")

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5",
    "Hello! How can I help you today? I am a helpful assistant. Thank you, goodbye.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024.",
    "a[b]c<d>e/SYS/INST",
] * 20


def _write(folder: Path, backend: Tokenizer, config: dict, generation: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return folder


def chatml_folder(folder: Path, vocab_size: int = 400) -> Path:
    """A ChatML byte-level BPE: ids 0..2 are <|endoftext|>, <|im_start|>, <|im_end|>; eos = <|im_end|>; no bos."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS, trainer=trainer)
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE,
              "model_max_length": 8192, "clean_up_tokenization_spaces": False}
    return _write(folder, backend, config, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})


def llama2_folder(folder: Path, vocab_size: int = 400) -> Path:
    """A Llama-2-style BPE: ``▁`` metaspace, byte fallback, <unk> <s> </s> at 0..2, bos prepended, [INST] template."""
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=[f"<0x{i:02X}>" for i in range(256)] + ["▁"])
    backend.train_from_iterator(CORPUS, trainer=trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[
        ("<s>", backend.token_to_id("<s>"))])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "pad_token": None, "chat_template": LLAMA2_TEMPLATE, "model_max_length": 4096,
              "clean_up_tokenization_spaces": False, "legacy": False}
    return _write(folder, backend, config, {"bos_token_id": 1, "eos_token_id": 2})


def llama3_folder(folder: Path, vocab_size: int = 600) -> Path:
    """A tokenizer trained by herd: Llama 3's layout, special tokens and chat template."""
    from herd.data.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=vocab_size).save(folder)


def style_folder(style: str, folder: Path) -> Path:
    """The tokenizer folder of ``style`` (one of :data:`STYLES`) written into ``folder``."""
    return {"chatml": chatml_folder, "llama2": llama2_folder, "llama3": llama3_folder}[style](folder)


DIALOGS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris is the capital."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "def add(a, b): what does it do?"},
     {"role": "assistant", "content": "It returns a + b."},
     {"role": "user", "content": "And print(add(2, 3))?"},
     {"role": "assistant", "content": "It prints 5.\nThank you!"}],
]

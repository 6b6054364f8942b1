"""Tiny GGUF files for the tests, written the way llama.cpp's convert_hf_to_gguf.py writes a Llama.

:func:`write_llama_gguf` takes a ``transformers.LlamaForCausalLM`` and a herd tokenizer and
writes ``general.architecture = llama``, the ``llama.*`` shape keys, the ``tokenizer.ggml.*``
keys of a byte-level BPE (model ``gpt2``: tokens, token types, merges, bos/eos ids, chat template)
and the tensors under GGUF names (``token_embd.weight``, ``blk.N.attn_q.weight``, ...,
``output_norm.weight``, ``output.weight``), with the query and key weights permuted for
llama.cpp's rotary layout as the convert script does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import torch

from helpers.synthetic import WORDS
from herd.data.tokenizer import LLAMA3_CHAT_TEMPLATE, Tokenizer, train_tokenizer

# GGUF name of each Hugging Face name inside a block (model.layers.N.<name>.weight -> blk.N.<gguf>.weight).
BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
TENSOR_TYPES = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
                "Q8_0": gguf.GGMLQuantizationType.Q8_0}
CONTROL, NORMAL = 3, 1  # llama.cpp's token types


def tiny_tokenizer(vocab_size: int = 600) -> Tokenizer:
    """A byte-level BPE with Llama 3's special tokens (``vocab_size - 256`` BPE ids), trained on the test words."""
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 12)) + f" {i}" for i in range(400)]
    return train_tokenizer(texts, vocab_size=vocab_size)


def permute_for_llama_cpp(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: the Hugging Face rotate-half rows to GGML's interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low: float = 1.0, high: float = 4.0,
                        original: int = 8192) -> np.ndarray:
    """The ``rope_freqs.weight`` llama.cpp writes for Llama 3's RoPE scaling (convert_hf_to_gguf.py)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factors = []
    for freq in freqs:
        wavelength = 2 * math.pi / freq
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_llama_gguf(path: Path, model, tokenizer: Tokenizer, *, tensor_type: str = "F32", architecture: str = "llama",
                     name: str = "tiny llama", pre: str = "llama-bpe", rope_freqs: np.ndarray | None = None,
                     chat_template: str | None = LLAMA3_CHAT_TEMPLATE) -> Path:
    """Write ``model`` (a LlamaForCausalLM) and ``tokenizer`` as one GGUF file at ``path``; returns ``path``.

    Matrices are stored as ``tensor_type`` (F32, F16 or Q8_0), norms as F32 (as llama.cpp does);
    a tied model has no ``output.weight``.
    """
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(name)
    writer.add_file_type({"F32": 0, "F16": 1, "Q8_0": 7}[tensor_type])
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    _add_tokenizer(writer, tokenizer, pre, chat_template)

    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"],
               "output_norm.weight": state["model.norm.weight"]}
    if not config.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        for hf_name, gguf_name in BLOCK_NAMES.items():
            weights = state[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weights = permute_for_llama_cpp(weights, config.num_attention_heads, config.num_attention_heads)
            elif gguf_name == "attn_k":
                weights = permute_for_llama_cpp(weights, config.num_attention_heads, config.num_key_value_heads)
            tensors[f"blk.{i}.{gguf_name}.weight"] = weights
    if rope_freqs is not None:
        tensors["rope_freqs.weight"] = rope_freqs
    for tensor_name, weights in tensors.items():
        _add_tensor(writer, tensor_name, weights, tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer, tokenizer: Tokenizer, pre: str, chat_template: str | None) -> None:
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))), "ids must be contiguous"
    specials = {t.content for t in tokenizer.backend.get_added_tokens_decoder().values() if t.special}
    merges = json.loads(tokenizer.to_json())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([CONTROL if t in specials else NORMAL for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.special_id("eot_id"))
    writer.add_eot_token_id(tokenizer.special_id("eot_id"))
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _add_tensor(writer, name: str, weights: np.ndarray, tensor_type: str) -> None:
    if weights.ndim == 1 or tensor_type == "F32":
        writer.add_tensor(name, weights.astype(np.float32))
    elif tensor_type == "F16":
        writer.add_tensor(name, weights.astype(np.float16))
    else:
        qtype = TENSOR_TYPES[tensor_type]
        quantized = gguf.quants.quantize(weights.astype(np.float32), qtype)
        writer.add_tensor(name, quantized, raw_dtype=qtype)


def random_llama(tie: bool = False, rope_parameters: dict | None = None, vocab_size: int = 600, seed: int = 1):
    """A tiny random ``LlamaForCausalLM`` (hidden 64, 2 layers, GQA 8/2), norms randomised too, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                         rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
                         tie_word_embeddings=tie, attn_implementation="eager")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # transformers initialises norms to 1: randomise them so that they are checked
        for parameter_name, parameter in model.named_parameters():
            if "norm" in parameter_name:
                parameter.uniform_(0.5, 1.5)
    return model.eval()

"""Llama 3.2 Vision directories: logits parity with transformers' MllamaForConditionalGeneration, load/save."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import MllamaConfig, MllamaForConditionalGeneration
from transformers.models.mllama.processing_mllama import (
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

from helpers.synthetic import write_word_level_tokenizer
from herd.interop import hf, mllama
from herd.interop.hf import CheckpointError
from herd.model import ModelConfig, Transformer
from herd.model.vision import ImageBatch, VisionConfig, VisionLanguageModel

ATOL = 1e-4
VOCAB = 100
IMAGE = VOCAB  # <|image|> is the first id after the text vocabulary
TILE = 16
# (a, b) tile grids in the order of VisionConfig.aspect_ratios for 4 tiles: id = index + 1
ASPECT_ID = {1: 1, 2: 2, 4: 6}  # 1 tile: (1, 1); 2 tiles: (1, 2); 4 tiles: (2, 2)


def reference_config(**text) -> MllamaConfig:
    vision = dict(hidden_size=32, num_hidden_layers=3, num_global_layers=2, attention_heads=4, intermediate_size=64,
                  image_size=TILE, patch_size=4, intermediate_layers_indices=[0, 2], vision_output_dim=96,
                  max_num_tiles=4)
    text_config = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=96, cross_attention_layers=[1, 4],
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0)
    text_config.update(text)
    return MllamaConfig(vision_config=vision, text_config=text_config, image_token_index=IMAGE)


def reference_model(path, **text) -> MllamaForConditionalGeneration:
    """A random Mllama with non-zero gates and random norms, saved to ``path`` and reloaded in eager fp32."""
    torch.manual_seed(1)
    model = MllamaForConditionalGeneration(reference_config(**text))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.uniform_(-1.0, 1.0)
            elif "norm" in name or "layernorm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return MllamaForConditionalGeneration.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def make_inputs(rows: list[tuple[list[int], list[int]]]):
    """Each row: (token ids with IMAGE where its images sit, tile counts of its images). Returns the
    transformers keyword arguments and herd's (tokens, ImageBatch)."""
    seq = max(len(tokens) for tokens, _ in rows)
    tokens = torch.tensor([ids + [0] * (seq - len(ids)) for ids, _ in rows])
    max_images = max(max(len(tiles) for _, tiles in rows), 1)
    pixels = torch.zeros(len(rows), max_images, 4, 3, TILE, TILE)
    aspect_ids = torch.zeros(len(rows), max_images, dtype=torch.long)
    aspect_mask = torch.zeros(len(rows), max_images, 4, dtype=torch.long)
    aspect_mask[:, :, 0] = 1
    flat = {"pixels": [], "ids": [], "tiles": [], "rows": []}
    for r, (_, tiles) in enumerate(rows):
        for i, n in enumerate(tiles):
            image = torch.randn(n, 3, TILE, TILE)
            pixels[r, i, :n] = image
            aspect_ids[r, i] = ASPECT_ID[n]
            aspect_mask[r, i, :n] = 1
            flat["pixels"].append(torch.cat([image, torch.zeros(4 - n, 3, TILE, TILE)]))
            flat["ids"].append(ASPECT_ID[n])
            flat["tiles"].append(n)
            flat["rows"].append(r)
    spans = [get_cross_attention_token_mask(ids, IMAGE) for ids, _ in rows]
    cross = convert_sparse_cross_attention_mask_to_dense(spans, [t for _, t in rows], 4, seq)
    reference = dict(input_ids=tokens, pixel_values=pixels, aspect_ratio_ids=aspect_ids,
                     aspect_ratio_mask=aspect_mask, cross_attention_mask=torch.from_numpy(cross))
    images = None
    if flat["rows"]:
        images = ImageBatch(torch.stack(flat["pixels"]), torch.tensor(flat["ids"]), torch.tensor(flat["tiles"]),
                            torch.tensor(flat["rows"]))
    return reference, tokens, images


def logits_difference(reference, model, rows) -> float:
    kwargs, tokens, images = make_inputs(rows)
    with torch.no_grad():
        expected = reference(**kwargs).logits
        got = model(tokens, images)
    assert got.shape == expected.shape
    lengths = [len(ids) for ids, _ in rows]
    return max((got[r, :n] - expected[r, :n]).abs().max().item() for r, n in enumerate(lengths))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("mllama")
    reference = reference_model(path)
    return reference, mllama.load_vision(path).eval(), path


def text(n: int, start: int = 3) -> list[int]:
    return [(start + 7 * i) % (VOCAB - 3) + 3 for i in range(n)]


def test_loaded_directory_has_the_interleaved_schedule_and_padded_tiles(pair):
    _, model, _ = pair
    assert model.cross_positions == (1, 3)  # list indices 1 and 4 of 6, before backbone blocks 1 and 3
    assert model.config.n_layers == 4 and model.config.vocab_size == VOCAB
    assert model.vision_config.pad_to_max_tiles  # what transformers (and Llama 3.2 Vision) compute
    assert model.vision_config.feature_layers == (0, 2)


def test_text_only_logits_match_transformers(pair):
    reference, model, _ = pair
    tokens = torch.tensor([[1, *text(20)], [1, *text(20, start=9)]])
    with torch.no_grad():
        expected = reference(input_ids=tokens).logits
        assert (model(tokens) - expected).abs().max().item() <= ATOL


@pytest.mark.parametrize("tiles", [1, 4], ids=["1_tile", "4_tiles"])
def test_one_image_logits_match_transformers(pair, tiles):
    reference, model, _ = pair
    rows = [([IMAGE, 1, *text(14)], [tiles]), ([IMAGE, 1, *text(10, start=5)], [tiles])]
    assert logits_difference(reference, model, rows) <= ATOL


def test_two_images_and_a_mixed_batch_match_transformers(pair):
    reference, model, _ = pair
    rows = [
        ([IMAGE, 1, *text(6), IMAGE, *text(8)], [4, 1]),  # the second image takes over after its token
        ([IMAGE, IMAGE, 1, *text(12)], [2, 4]),  # consecutive images: both seen from the second on
        ([IMAGE, 1, *text(5)], [1]),
    ]
    assert logits_difference(reference, model, rows) <= ATOL


def test_a_row_without_images_in_an_image_batch_matches_transformers_text_only(pair):
    reference, model, _ = pair
    kwargs, tokens, images = make_inputs([([IMAGE, 1, *text(9)], [1]), ([1, *text(9)], [])])
    with torch.no_grad():
        got = model(tokens, images)
        alone = reference(input_ids=tokens[1:]).logits
    assert (got[1:] - alone).abs().max().item() <= ATOL


def test_text_before_the_first_image_skips_the_cross_layers_as_meta_reference_does(pair):
    """transformers lets such positions attend every image (it masks only the MLP); herd skips
    the whole block there, as Meta's reference code does: each cross-attention block hands those
    positions on unchanged (checked exactly, by a hook), so they equal the text-only ones."""
    _, model, _ = pair
    prefix = [1, *text(4)]
    _, tokens, images = make_inputs([([*prefix, IMAGE, *text(6)], [1])])
    changed = []  # per cross-attention block: (batch, seq), True where its output differs from its input

    def record(block, args, out):
        changed.append((out != args[0]).any(dim=-1))

    hooks = [block.register_forward_hook(record) for block in model.cross_layers]
    try:
        with torch.no_grad():
            with_image = model(tokens, images)
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        text_only = model(torch.tensor([prefix]))
    assert len(changed) == len(model.cross_layers) == 2
    for index, altered in enumerate(changed):
        before = altered[0, : len(prefix)].nonzero().flatten().tolist()
        assert before == [], f"cross-attention block {index} changed positions {before}, before the first image"
        assert altered[0, len(prefix):].all(), f"cross-attention block {index} left the image's positions unchanged"
    # Sequences of 12 and 5 tokens: the kernels may block and reduce differently, so not bitwise.
    scale = max(1.0, text_only.abs().max().item())
    torch.testing.assert_close(with_image[:, : len(prefix)], text_only, rtol=0, atol=1e-6 * scale)


def test_a_cross_layer_after_the_last_block_matches_transformers(tmp_path):
    reference = reference_model(tmp_path, cross_attention_layers=[1, 5])  # the last of 6: after all 4 blocks
    model = mllama.load_vision(tmp_path).eval()
    assert model.cross_positions == (1, 4)
    rows = [([IMAGE, 1, *text(9)], [4]), ([IMAGE, 1, *text(6, start=4)], [1])]
    assert logits_difference(reference, model, rows) <= ATOL


def test_save_then_transformers_loads_the_same_model(tmp_path, pair):
    reference, model, _ = pair
    out = mllama.save_vision(model, tmp_path / "saved")
    reloaded = MllamaForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    again = mllama.load_vision(out)
    assert again.vision_config == model.vision_config
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def herd_model(tied: bool, pad_to_max_tiles: bool = False) -> VisionLanguageModel:
    backbone = Transformer(ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                                       multiple_of=16, tie_embeddings=tied))
    vision = VisionConfig(image_size=TILE, patch_size=4, dim=32, n_layers=2, n_global_layers=1, n_heads=4,
                          ffn_dim=64, feature_layers=(0,), max_num_tiles=4, cross_attention_every=2,
                          pad_to_max_tiles=pad_to_max_tiles)
    model = VisionLanguageModel(backbone, vision)
    with torch.no_grad():
        for block in model.cross_layers:
            block.attention_gate.fill_(0.5)
            block.ffn_gate.fill_(-0.3)
    return model.eval()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_herd_model_saved_as_mllama_gives_the_same_logits_in_transformers(tmp_path, tied):
    model = herd_model(tied)
    out = mllama.save_vision(model, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["cross_attention_layers"] == [1, 4]  # before blocks 1 and 3 of 4
    assert config["vision_config"]["herd_pad_to_max_tiles"] is False
    reference = MllamaForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    rows = [([IMAGE, 1, *text(12)], [4]), ([IMAGE, 1, *text(7)], [4])]  # max_num_tiles tiles: no padding either way
    assert logits_difference(reference, model, rows) <= ATOL
    again = mllama.load_vision(out)
    assert again.config.tie_embeddings is tied and not again.vision_config.pad_to_max_tiles


def test_save_adds_the_image_token_to_the_tokenizer(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    write_word_level_tokenizer(tmp_path / "tok", VOCAB)
    out = mllama.save_vision(herd_model(False), tmp_path / "out", tokenizer=tmp_path / "tok")
    assert Tokenizer.from_file(str(out / "tokenizer.json")).token_to_id("<|image|>") == IMAGE
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("<|image|>") == IMAGE
    assert json.loads((out / "preprocessor_config.json").read_text())["max_image_tiles"] == 4


def test_a_tokenizer_of_another_size_is_refused_before_writing(tmp_path):
    write_word_level_tokenizer(tmp_path / "tok", VOCAB - 3)
    with pytest.raises(CheckpointError, match="vocab_size"):
        mllama.save_vision(herd_model(False), tmp_path / "out", tokenizer=tmp_path / "tok")
    assert not (tmp_path / "out").exists()


def test_unknown_or_missing_tensors_are_refused_by_name(tmp_path, pair):
    from safetensors.torch import load_file, save_file

    _, _, path = pair
    state = load_file(str(path / "model.safetensors"))
    state["vision_model.extra.weight"] = torch.zeros(1)
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "config.json").write_text((path / "config.json").read_text())
    save_file(state, str(tmp_path / "extra" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="vision_model.extra.weight"):
        mllama.load_vision(tmp_path / "extra")
    del state["vision_model.extra.weight"], state["multi_modal_projector.bias"]
    save_file(state, str(tmp_path / "extra" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="projection.bias"):
        mllama.load_vision(tmp_path / "extra")


def test_image_token_not_after_the_vocabulary_is_refused(tmp_path, pair):
    _, _, path = pair
    config = json.loads((path / "config.json").read_text())
    config["image_token_index"] = 5
    with pytest.raises(CheckpointError, match="image_token_index"):
        mllama.configs_from_hf(config)


def test_vision_directories_are_mllama_s_and_the_llama_reader_refuses_them(tmp_path, pair):
    _, model, path = pair
    loaded = mllama.load_vision(path)
    assert isinstance(loaded, VisionLanguageModel)
    assert (mllama.save_vision(loaded, tmp_path / "again") / "config.json").is_file()
    with pytest.raises(CheckpointError, match="model_type is 'mllama'"):
        hf.load(path)

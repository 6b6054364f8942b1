"""The vision adapter around an unchanged backbone: exact text-only behaviour, masks, schedule, tiles, presets."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from herd.model import ModelConfig, Transformer
from herd.model.vision import (
    ImageBatch,
    VisionConfig,
    VisionLanguageModel,
    count_parameters,
    cross_attention_mask,
)
from herd.presets import model_preset, vision_preset

VOCAB = 97
IMAGE = VOCAB


def backbone(**changes) -> Transformer:
    config = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=16,
                         max_seq_len=256, **changes)
    return Transformer(config).eval()


def vision_config(**changes) -> VisionConfig:
    values = dict(image_size=16, patch_size=4, dim=32, n_layers=2, n_global_layers=1, n_heads=4, ffn_dim=64,
                  feature_layers=(0,), max_num_tiles=4, cross_attention_every=2)
    return VisionConfig(**{**values, **changes})


def model(open_gates: bool = True, **changes) -> VisionLanguageModel:
    vlm = VisionLanguageModel(backbone(), vision_config(**changes)).eval()
    if open_gates:
        with torch.no_grad():
            for block in vlm.cross_layers:
                block.attention_gate.fill_(0.7)
                block.ffn_gate.fill_(-0.4)
    return vlm


def images(tiles: list[int], rows: list[int], max_tiles: int | None = None) -> ImageBatch:
    width = max_tiles or max(tiles)
    pixels = torch.randn(len(tiles), width, 3, 16, 16)
    aspect = {1: 1, 2: 2, 3: 3, 4: 6}
    return ImageBatch(pixels, torch.tensor([aspect[t] for t in tiles]), torch.tensor(tiles), torch.tensor(rows))


def text(n: int, start: int = 1) -> list[int]:
    return [(start + 5 * i) % (VOCAB - 1) + 1 for i in range(n)]


def test_without_images_the_logits_are_the_backbones_bit_for_bit():
    vlm = model()
    tokens = torch.randint(0, VOCAB, (3, 20))
    documents = torch.tensor([[0] * 8 + [1] * 12] * 3)
    with torch.no_grad():
        assert torch.equal(vlm(tokens), vlm.backbone(tokens))
        assert torch.equal(vlm(tokens, document_ids=documents), vlm.backbone(tokens, document_ids=documents))


def test_with_zero_gates_images_change_nothing_bit_for_bit():
    """At initialisation (gates at 0) the model is the backbone whatever the images: the reference is
    the backbone with the 8 new embedding rows appended to its table."""
    vlm = model(open_gates=False)
    config = dataclasses.replace(vlm.config, vocab_size=VOCAB + 8)
    reference = Transformer(config).eval()
    state = {k: v for k, v in vlm.backbone.state_dict().items() if not k.startswith("rope.")}
    state["tok_embeddings.weight"] = torch.cat([state["tok_embeddings.weight"], vlm.extra_embeddings.weight])
    state["output.weight"] = torch.cat([state["output.weight"], torch.zeros(8, 64)])
    reference.load_state_dict(state, strict=False)
    tokens = torch.tensor([[IMAGE, 1, *text(10)], [IMAGE, *text(5), IMAGE, *text(5)]])
    with torch.no_grad():
        got = vlm(tokens, images([4, 1, 2], [0, 1, 1]), output_hidden=True)
        other = vlm(tokens, images([1, 3, 4], [0, 1, 1]), output_hidden=True)
        expected = reference(tokens, output_hidden=True)
    # Bitwise: both sides run the same blocks on the same (2, 12) shapes; zero gates add exact zeros.
    assert torch.equal(got, expected) and torch.equal(other, expected)


def test_a_mixed_batch_equals_its_rows_run_alone():
    vlm = model()
    rows = [[IMAGE, 1, *text(12)], [1, *text(9)], [IMAGE, *text(4), IMAGE, *text(6)], [IMAGE, IMAGE, *text(7)]]
    tiles = [[4], [], [1, 2], [3, 1]]
    seq = max(map(len, rows))
    tokens = torch.tensor([r + [0] * (seq - len(r)) for r in rows])
    batch = images([t for ts in tiles for t in ts], [i for i, ts in enumerate(tiles) for _ in ts])
    with torch.no_grad():
        together = vlm(tokens, batch)
        for i, row in enumerate(rows):
            members = [j for j, r in enumerate(batch.rows.tolist()) if r == i]
            alone_images = None
            if members:
                index = torch.tensor(members)
                alone_images = ImageBatch(batch.pixels[index], batch.aspect_ratio_ids[index], batch.num_tiles[index],
                                          torch.zeros(len(members), dtype=torch.long))
            alone = vlm(torch.tensor([row]), alone_images)
            torch.testing.assert_close(together[i, : len(row)], alone[0], atol=1e-5, rtol=1e-5)
        # a row without images is exactly the backbone's row in a batch of the same shape
        assert torch.equal(together[1], vlm.backbone(tokens.masked_fill(tokens == IMAGE, 0))[1])


def test_positions_before_any_image_and_rows_without_images_pass_unchanged():
    vlm = model()
    block = vlm.cross_layers[0]
    x = torch.randn(2, 6, 64)
    vision = torch.randn(2, 5, 64)
    mask = torch.ones(2, 1, 6, 5, dtype=torch.bool)
    has_image = torch.tensor([[False, False, True, True, True, True], [False] * 6])
    out = block(x, vision, mask, has_image)
    assert torch.equal(out[0, :2], x[0, :2]) and torch.equal(out[1], x[1])
    assert not torch.allclose(out[0, 2:], x[0, 2:])


def test_cross_attention_mask_follows_the_latest_run_of_images():
    # positions:     0      1      2  3  4      5  6
    tokens = torch.tensor([[5, IMAGE, IMAGE, 6, 7, IMAGE, 8]])
    key_image = torch.tensor([[0, 0, 1, 2, 2, 2, -1]])  # image 0: 2 keys, image 1: 1 key, image 2: 3 keys, padding
    mask, has_image = cross_attention_mask(tokens, IMAGE, key_image, torch.tensor([3]))
    sees = [[int(image) for image in range(3) if bool(mask[0, 0, t][key_image[0] == image].all())
             and has_image[0, t]] for t in range(7)]
    assert sees == [[], [0], [0, 1], [0, 1], [0, 1], [2], [2]]
    assert not has_image[0, 0] and not bool(mask[0, 0, 1, -1])  # padding keys are never attended


def test_cross_attention_mask_stays_inside_documents():
    tokens = torch.tensor([[IMAGE, 5, 6, 7, 8, 9]])
    documents = torch.tensor([[0, 0, 0, 1, 1, 1]])
    _, has_image = cross_attention_mask(tokens, IMAGE, torch.tensor([[0, 0]]), torch.tensor([1]), documents)
    assert has_image.tolist() == [[True, True, True, False, False, False]]


def test_image_tokens_and_images_must_agree():
    vlm = model()
    tokens = torch.tensor([[IMAGE, 1, 2, IMAGE, 3]])
    with pytest.raises(ValueError, match=r"row 0 has 2 <\|image\|> token\(s\).*1 image"):
        vlm(tokens, images([1], [0]))
    with pytest.raises(ValueError, match="no images were given"):
        vlm(tokens)


def test_fusion_schedule_positions():
    assert VisionConfig().cross_attention_positions(32) == (3, 7, 11, 15, 19, 23, 27, 31)
    assert VisionConfig().cross_attention_positions(80) == tuple(range(3, 80, 4))
    assert VisionConfig(cross_attention_every=2).cross_attention_positions(4) == (1, 3)
    assert VisionConfig(cross_attention_layers=[0, 2]).cross_attention_positions(4) == (0, 2)
    with pytest.raises(ValueError, match="cross_attention_layers"):
        VisionConfig(cross_attention_layers=[2, 9]).cross_attention_positions(4)
    vlm = model()
    assert vlm.cross_positions == (1, 3) and len(vlm.cross_layers) == 2


def test_cross_attention_runs_before_its_block():
    """Opening only the gates of the block before backbone block 3 changes nothing up to block 2."""
    vlm = model(open_gates=False)
    with torch.no_grad():
        vlm.cross_layers[1].attention_gate.fill_(1.0)
    seen = {}
    for index, block in enumerate(vlm.backbone.layers):
        block.register_forward_hook(lambda module, args, out, index=index: seen.__setitem__(index, args[0].clone()))
    tokens = torch.tensor([[IMAGE, *text(8)]])
    with torch.no_grad():
        vlm(tokens, images([1], [0]))
        with_image = dict(seen)
        vlm.cross_layers[1].attention_gate.zero_()
        vlm(tokens, images([1], [0]))
    # Bitwise: blocks 0-2 get the same inputs at the same shapes in both runs.
    assert all(torch.equal(with_image[i], seen[i]) for i in range(3))
    assert not torch.equal(with_image[3][:, 1:], seen[3][:, 1:])


def test_tiles_are_encoded_at_their_own_count_unless_padding_is_asked_for():
    compact = model()
    padded = model(pad_to_max_tiles=True)
    padded.load_state_dict(compact.state_dict())
    tokens = torch.tensor([[IMAGE, *text(6)]])
    four, one = images([4], [0]), images([1], [0], max_tiles=1)
    with torch.no_grad():
        assert torch.allclose(compact(tokens, four), padded(tokens, four), atol=1e-6)
        # a 1-tile image: Mllama's padding tiles are attended by its patches, so the tokens differ
        difference = compact.encode_images(one, 1).states - padded.encode_images(one, 1).states
        assert difference.abs().max() > 1e-5  # float noise is ~1e-7
        vision = compact.encode_images(images([1, 4, 1], [0, 0, 0]), batch=1)
    assert vision.states.shape[1] == (1 + 4 + 1) * compact.vision_config.num_patches  # no padding tiles


def test_generate_reads_the_image():
    vlm = model()
    prompts = [[IMAGE, 1, 2], [IMAGE, 3]]
    batch = images([1, 2], [0, 1])
    vlm_images = ImageBatch(batch.pixels[1:], batch.aspect_ratio_ids[1:], batch.num_tiles[1:], torch.tensor([0]))
    out = vlm.generate(prompts, batch, max_new_tokens=4)
    assert [len(o) for o in out] == [4, 4]
    with torch.no_grad():  # the first generated token is the argmax after the prompt alone
        first = vlm(torch.tensor([prompts[1]]), vlm_images)
    assert out[1][0] == int(first[0, -1].argmax())


# Parameter counts of transformers' MllamaForConditionalGeneration built on the meta device from the
# released configs (Llama-3.2-11B-Vision, Llama-3.2-90B-Vision), and the model card's figures.
MLLAMA_PARAMETERS = {"llama3_2_11b_vision": 10_670_220_835, "llama3_2_90b_vision": 88_593_355_323}
PUBLISHED = {"llama3_2_11b_vision": 10.6e9, "llama3_2_90b_vision": 88.8e9}
BACKBONE = {"llama3_2_11b_vision": "llama3_8b", "llama3_2_90b_vision": "llama3_70b"}


@pytest.mark.parametrize("preset", sorted(MLLAMA_PARAMETERS))
def test_preset_parameter_counts_on_the_meta_device(preset):
    with torch.device("meta"):
        vlm = VisionLanguageModel(Transformer(model_preset(BACKBONE[preset])), vision_preset(preset))
    total = count_parameters(vlm)
    assert total == MLLAMA_PARAMETERS[preset]
    assert abs(total - PUBLISHED[preset]) / PUBLISHED[preset] < 0.01
    assert count_parameters(vlm.encoder) == 863_567_379  # the ViT-H/14 with 8 global layers (~850M in the paper)
    interleaved = [block + n for n, block in enumerate(vlm.cross_positions)]
    assert interleaved == (list(range(3, 40, 5)) if "11b" in preset else list(range(3, 100, 5)))


def test_tiny_preset_builds():
    vlm = VisionLanguageModel(Transformer(model_preset("tiny")), vision_preset("tiny"))
    assert vlm.cross_positions == (1, 3)
    assert vlm.vision_config.num_patches == 17

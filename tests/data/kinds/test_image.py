"""Image-caption sources: the rendered set, inputs, bad images, prepare, shards and the batches they give."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from helpers.synthetic import damage_first_media, prepare_config
from herd.data.embedded.shapes import caption_attributes, shapes_options, stdlib_shapes
from herd.data.inputs import BadInputError
from herd.data.kinds import PrepareError
from herd.data.kinds.image import ImageTiler, encode_example, image_token_id, iter_examples
from herd.data.loaders.image import ImageCaptionDataModule
from herd.data.shards import ShardError
from herd.model.vision import VisionConfig
from herd.prepare import prepare


def _png(colour=(200, 10, 10), size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def test_rendered_pictures_are_deterministic_and_their_captions_name_what_is_drawn():
    first, again = list(stdlib_shapes(30, seed=3)), list(stdlib_shapes(30, seed=3))
    assert [p.png for p in first] == [p.png for p in again]
    assert len({p.caption for p in stdlib_shapes(400)}) == 36  # every count x colour x shape
    for picture in first:
        assert caption_attributes(picture.caption) == picture.attributes
        image = Image.open(io.BytesIO(picture.png))
        assert image.size == (64, 64)
    one = next(p for p in first if p.attributes["count"] == "one")
    assert not one.caption.endswith("s")
    with pytest.raises(ValueError, match="unknown option 'colour'"):
        shapes_options("stdlib:shapes?colour=red")


def test_an_example_is_image_bos_prompt_caption_eos_trained_on_the_caption(tiny_tokenizer):
    image = image_token_id(tiny_tokenizer)
    assert image == tiny_tokenizer.vocab_size  # a tokenizer without <|image|>: the first id after it
    ids, mask = encode_example(tiny_tokenizer, image, "A picture of ", "two red circles")
    text = tiny_tokenizer.encode("A picture of two red circles")  # one text, as the model reads it
    assert ids.tolist() == [image, tiny_tokenizer.bos_id, *text, tiny_tokenizer.eos_id]
    trained = ids[mask].tolist()
    assert tiny_tokenizer.decode(trained[:-1]).strip() == "two red circles" and trained[-1] == tiny_tokenizer.eos_id
    assert not mask[:2].any() and tiny_tokenizer.decode(ids[2:][~mask[2:]].tolist()).strip() == "A picture of"
    bare, bare_mask = encode_example(tiny_tokenizer, image, "", "two")
    assert bare.tolist()[2:-1] == tiny_tokenizer.encode("two") and bare_mask[2:].all()


def test_folder_and_jsonl_inputs_and_their_bad_inputs_are_named(tmp_path):
    folder = tmp_path / "pics"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png())
    (folder / "a.txt").write_text("a red box\n")
    (folder / "b.png").write_bytes(_png())  # no caption
    (folder / "c.png").write_bytes(_png())
    (folder / "c.txt").write_text("   ")  # empty caption
    lines = [{"image": "pics/a.png", "caption": "again", "group": "g"}, {"image": 3, "caption": "x"}, "[1]"]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    bad: list[BadInputError] = []
    examples = list(iter_examples([str(folder), str(tmp_path / "list.jsonl")], "**/*", bad.append))
    assert [(e.id, e.text, e.split_key) for e in examples] == [
        ("a.png", "a red box", "a.png"), (f"{tmp_path / 'list.jsonl'}:1", "again", "g")]
    assert examples[1].read() == _png()
    assert [(e.reason, e.location) for e in bad] == [
        ("no_caption", "b.png"), ("empty_caption", "c.png"), ("bad_field", f"{tmp_path / 'list.jsonl'}:2"),
        ("not_an_object", f"{tmp_path / 'list.jsonl'}:3")]


@pytest.fixture(scope="module")
def prepared(tiny_tokenizer, tmp_path_factory):
    """40 rendered pictures plus a folder with one corrupt and one truncated image, prepared."""
    root = tmp_path_factory.mktemp("images")
    folder = root / "mine"
    folder.mkdir()
    for name, data in [("good.png", _png()), ("corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64),
                       ("cut.png", _png(size=(64, 64))[:-40])]:
        (folder / name).write_bytes(data)
        (folder / name).with_suffix(".txt").write_text(f"the {name} picture")
    tokenizer = tiny_tokenizer.save(root / "tokenizer")
    out = prepare(prepare_config(root / "out", {"shapes": {"input": "stdlib:shapes?count=40"},
                                         "mine": {"input": str(folder), "kind": "image", "prompt": "Look: ",
                                                  "max_bad_fraction": 1.0}},
                          tokenizer={"path": str(tokenizer)}))
    return out


def test_prepare_counts_corrupt_images_as_skips_naming_them(prepared, caplog):
    manifest = json.loads((prepared / "manifest.json").read_text())
    mine, shapes = manifest["sources"]["mine"], manifest["sources"]["shapes"]
    assert mine["skipped"] == {"corrupt_image": 2} and mine["examples"] == 1
    assert shapes["kind"] == "image" and shapes["layout"]["packing"] == "example"
    assert shapes["examples"] == 40 and shapes["skipped"] == {}
    assert shapes["splits"]["train"]["examples"] + shapes["splits"]["val"]["examples"] == 40
    assert len(shapes["splits"]["train"]["shards"]) >= 2
    assert shapes["image_token_id"] == manifest["tokenizer"]["vocab_size"]


def test_prepare_fails_when_too_many_images_are_bad(tiny_tokenizer, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "corrupt.png").write_bytes(b"not an image")
    (folder / "corrupt.txt").write_text("a caption")
    (folder / "good.png").write_bytes(_png())
    (folder / "good.txt").write_text("a caption")
    with pytest.raises(PrepareError, match=r"1 of 2 inputs .*\(corrupt_image: 1\)"):
        prepare(prepare_config(tmp_path / "out", {"mine": {"input": str(folder), "kind": "image"}},
                        tokenizer={"path": str(tiny_tokenizer.save(tmp_path / "tok"))}))
    assert not (tmp_path / "out").exists()


def tiler_config() -> VisionConfig:
    return VisionConfig(image_size=32, patch_size=8, dim=32, n_layers=2, n_heads=4, feature_layers=(0,),
                        max_num_tiles=4)


def tiler() -> ImageTiler:
    return ImageTiler.for_model(tiler_config())


def test_tiling_follows_the_aspect_ratio_and_keeps_only_real_tiles():
    tiles = tiler()(Image.new("RGB", (100, 40)))
    assert tiles.num_tiles == 3 and tiles.aspect_ratio_id == 3  # a 1 x 3 grid, id of (1, 3) in the list + 1
    assert tiles.pixels.shape == (3, 3, 32, 32) and tiles.pixels.dtype == np.float32
    assert tiler()(Image.new("RGB", (64, 64))).num_tiles == 4
    assert tiler()(Image.new("RGB", (20, 20))).num_tiles == 1


def test_batches_hold_the_caption_targets_and_each_images_own_tiles(prepared, tiny_tokenizer):
    dm = ImageCaptionDataModule(str(prepared), {"shapes": {}}, batch_size=5, num_workers=0, shuffle_buffer=1)
    dm.set_tiler(tiler())
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"tokens", "targets", "pixel_values", "aspect_ratio_ids", "num_tiles", "image_rows",
                          "skipped_images"}
    assert batch["pixel_values"].shape == (5, 4, 3, 32, 32)  # 64-pixel pictures: 2 x 2 tiles of 32
    assert batch["tokens"][:, 0].eq(dm.image_token_id).all()
    for targets in batch["targets"]:
        caption = targets[targets != -100].tolist()
        assert caption[-1] == tiny_tokenizer.eos_id
        assert caption_attributes(tiny_tokenizer.decode(caption[:-1])) is not None
    val = list(dm.val_dataloader())
    assert sum(len(b["tokens"]) for b in val) == json.loads((prepared / "manifest.json").read_text())[
        "sources"]["shapes"]["splits"]["val"]["examples"]


def test_a_damaged_image_in_a_shard_is_skipped_and_counted_in_training_and_masked_in_validation(
        prepared, tmp_path, caplog):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    manifest = damage_first_media(copy, "shapes", "image.png")  # each shard's first image no longer decodes
    dm = ImageCaptionDataModule(str(copy), {"shapes": {}}, batch_size=4, num_workers=0, shuffle_buffer=1)
    dm.set_tiler(tiler())
    train_shards = len(manifest["sources"]["shapes"]["splits"]["train"]["shards"])
    train_examples = manifest["sources"]["shapes"]["splits"]["train"]["examples"]
    seen = 0
    for batch, _ in zip(dm.train_dataloader(), range(-(-train_examples // 4)), strict=False):
        dm.on_before_batch_transfer(batch, 0)
        seen += len(batch["tokens"])
    assert dm.skipped_images >= train_shards
    assert "skipped an image that does not decode" in caplog.text and "shapes-0-" in caplog.text
    val = [dm.on_before_batch_transfer(b, 0) for b in dm.val_dataloader()]
    assert sum(len(b["tokens"]) for b in val) == manifest["sources"]["shapes"]["splits"]["val"]["examples"]
    masked = sum(int((b["targets"] != -100).sum(dim=1).eq(0).sum()) for b in val)
    assert masked == len(manifest["sources"]["shapes"]["splits"]["val"]["shards"])


def test_a_shard_with_another_checksum_is_refused(prepared, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    shard = copy / manifest["sources"]["shapes"]["splits"]["train"]["shards"][0]["path"]
    data = bytearray(shard.read_bytes())
    data[1000:1010] = b"\xff" * 10  # inside the first sample
    shard.write_bytes(bytes(data))
    dm = ImageCaptionDataModule(str(copy), {"shapes": {}}, batch_size=2, num_workers=0, shuffle_buffer=1)
    dm.set_tiler(tiler())
    with pytest.raises(ShardError, match="sha256"):
        next(iter(dm.train_dataloader()))


def test_the_ids_the_image_kind_writes_are_those_the_vision_model_embeds(prepared):
    """<|image|> is the model's image_token_id, and every id a batch holds has an embedding row."""
    import torch

    from herd.model import ModelConfig, Transformer
    from herd.model.vision import VisionLanguageModel

    dm = ImageCaptionDataModule(str(prepared), {"shapes": {}}, batch_size=4, num_workers=0, shuffle_buffer=1)
    dm.set_tiler(tiler())
    vocab = dm.manifest.vocab_size
    backbone = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=vocab, multiple_of=16))
    model = VisionLanguageModel(backbone, tiler_config())
    assert dm.image_token_id == model.image_token_id == vocab
    assert vocab + dm.new_ids == vocab + model.extra_embeddings.num_embeddings  # the rows the loader allows
    tokens = next(iter(dm.train_dataloader()))["tokens"]
    assert int(tokens.max()) < vocab + model.extra_embeddings.num_embeddings
    with torch.no_grad():
        embedded = model.embed(tokens)
    assert torch.equal(embedded[:, 0], model.extra_embeddings.weight[0].expand(len(tokens), -1))  # <|image|>'s row
    assert torch.equal(embedded[:, 1], backbone.tok_embeddings(tokens[:, 1]))  # then the backbone's own rows


def test_the_image_datamodule_refuses_text_sources_and_needs_a_tiler(prepared, prepared_corpus):
    from herd.data.manifest import ManifestError

    with pytest.raises(ManifestError, match="no image sources"):
        ImageCaptionDataModule(str(prepared_corpus))
    dm = ImageCaptionDataModule(str(prepared), num_workers=0)
    assert sorted(s["name"] for s in dm.sources) == ["mine", "shapes"]
    with pytest.raises(RuntimeError, match="stage=vision_adapter"):
        dm.train_dataloader()

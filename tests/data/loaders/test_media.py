"""What every media DataModule shares: the share of the data each rank reads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from lightning.pytorch.strategies import ModelParallelStrategy

from helpers.synthetic import prepare_config
from herd.data.kinds.image import ImageTiler
from herd.data.loaders.image import ImageCaptionDataModule
from herd.model.vision import VisionConfig
from herd.prepare import prepare

WORLD, TENSOR_PARALLEL = 4, 2


@pytest.fixture(scope="module")
def prepared(tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    tokenizer = tiny_tokenizer.save(root / "tokenizer")
    return prepare(prepare_config(root / "out", {"shapes": {"input": "stdlib:shapes?count=40"}},
                                  tokenizer={"path": str(tokenizer)}))


class _Mesh:
    """A (data_parallel, tensor_parallel) = (2, 2) device mesh as seen by ``global_rank``: the
    tensor-parallel ranks of one replica are neighbours (0, 1 | 2, 3), as torch lays them out."""

    def __init__(self, global_rank: int) -> None:
        self.global_rank = global_rank

    def __getitem__(self, name: str) -> SimpleNamespace:
        local = self.global_rank // TENSOR_PARALLEL if name == "data_parallel" else self.global_rank % TENSOR_PARALLEL
        size = WORLD // TENSOR_PARALLEL if name == "data_parallel" else TENSOR_PARALLEL
        return SimpleNamespace(size=lambda: size, get_local_rank=lambda: local)


def _trainer(global_rank: int) -> SimpleNamespace:
    """Lightning's ModelParallelStrategy on a mesh of 2 data-parallel x 2 tensor-parallel ranks."""
    strategy = ModelParallelStrategy(data_parallel_size=WORLD // TENSOR_PARALLEL,
                                     tensor_parallel_size=TENSOR_PARALLEL)
    strategy._device_mesh = _Mesh(global_rank)
    return SimpleNamespace(strategy=strategy, global_rank=global_rank, world_size=WORLD, training=False)


def _rows(prepared, global_rank: int, split: str) -> list[tuple[int, ...]]:
    dm = ImageCaptionDataModule(str(prepared), batch_size=2, num_workers=0, shuffle_buffer=4)
    dm.set_tiler(ImageTiler.for_model(VisionConfig(image_size=32, patch_size=8, dim=32, n_layers=2, n_heads=4,
                                                   feature_layers=(0,), max_num_tiles=4)))
    dm.trainer = _trainer(global_rank)
    loader = dm.val_dataloader() if split == "val" else dm.train_dataloader()
    rows = []
    for batch, _ in zip(loader, range(3 if split == "train" else 1 << 30), strict=False):
        rows += [tuple(row[row != dm.pad_id].tolist()) for row in batch["tokens"]]
    return rows


@pytest.mark.parametrize("split", ["val", "train"])
def test_tensor_parallel_ranks_of_one_replica_read_the_same_examples(prepared, split):
    """Ranks are split by the data-parallel rank (as the text DataModule does), not the global one:
    ranks 0 and 1 (one replica) read the same rows, ranks 0 and 2 (two replicas) different ones."""
    rows = [_rows(prepared, rank, split) for rank in range(WORLD)]
    assert rows[0] == rows[1] and rows[2] == rows[3]
    assert rows[0] != rows[2]
    if split == "val":  # the two replicas share the val split between them
        val = ImageCaptionDataModule(str(prepared), batch_size=2).manifest.data["sources"]["shapes"]["splits"]["val"]
        assert len(rows[0]) + len(rows[2]) == val["examples"] // 2 * 2

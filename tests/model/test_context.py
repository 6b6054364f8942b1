"""Context parallelism: the load-balanced layout, and losses and gradients equal to one process's.

The multi-process checks run on gloo (fp32) with packed, document-masked rows and shared-prompt
rows, against the same model run whole in one process:
- CP=2 (2 processes) and CP=4 (4 processes);
- CP=2 x FSDP2 data parallel 2, and CP=2 x tensor parallel 2 (4 processes), through the same
  ``herd.stages.parallelize`` functions and mesh that training uses.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from herd.constants import IGNORE_INDEX
from herd.model import ModelConfig, Transformer
from herd.model.context import ContextParallel, _to_rank_order, _to_row_order
from herd.model.loss import next_token_loss

SEQ = 32
RTOL = 1e-5


def config() -> ModelConfig:
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=64)


def rows(batch: int, seed: int = 0, shared_prompt: bool = False) -> dict[str, torch.Tensor]:
    """Packed rows of documents of uneven lengths (and, with ``shared_prompt``, prompts with two responses)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 97, (batch, SEQ), generator=generator)
    document_ids = torch.zeros(batch, SEQ, dtype=torch.long)
    for row in range(batch):
        cuts = sorted(torch.randperm(SEQ - 2, generator=generator)[:3].add(1).tolist())
        for cut in cuts:
            document_ids[row, cut:] += 1
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = IGNORE_INDEX
    targets[document_ids != torch.roll(document_ids, -1, dims=1)] = IGNORE_INDEX  # never across documents
    targets[torch.rand(batch, SEQ, generator=generator) < 0.3] = IGNORE_INDEX  # some positions unscored
    batch_ = {"tokens": tokens, "document_ids": document_ids, "targets": targets}
    if shared_prompt:
        response_ids = torch.zeros(batch, SEQ, dtype=torch.long)
        for row in range(batch):  # in each document: a prompt, then responses 1 and 2
            for document in document_ids[row].unique():
                places = (document_ids[row] == document).nonzero().flatten()
                third = max(1, places.numel() // 3)
                response_ids[row, places[third : 2 * third]] = 1
                response_ids[row, places[2 * third :]] = 2
        batch_["response_ids"] = response_ids
    return batch_


# ------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_rank_i_holds_chunks_i_and_2cp_minus_1_minus_i(size):
    seq = 2 * size * 3
    chunk = seq // (2 * size)
    held = []
    for rank in range(size):
        index = ContextParallel(size=size, rank=rank).local_index(seq)
        chunks = sorted({int(i) // chunk for i in index})
        assert chunks == sorted([rank, 2 * size - 1 - rank])
        assert index.tolist() == sorted(index.tolist())  # each chunk whole and in order
        held.append(index)
    assert sorted(torch.cat(held).tolist()) == list(range(seq))  # every place held exactly once


@pytest.mark.parametrize("size", [2, 4])
def test_layout_balances_causal_work(size):
    """Causal attention's work of a query is its place + 1: every rank gets the same total."""
    seq = 2 * size * 8
    work = [int((ContextParallel(size=size, rank=r).local_index(seq) + 1).sum()) for r in range(size)]
    assert len(set(work)) == 1
    # A plain split into `size` contiguous pieces is far from balanced: that is what the layout fixes.
    contiguous = [int(torch.arange(r * seq // size, (r + 1) * seq // size).add(1).sum()) for r in range(size)]
    assert max(contiguous) / min(contiguous) > 2


@pytest.mark.parametrize("size", [2, 4])
def test_row_order_is_the_inverse_of_rank_order(size):
    row = torch.arange(2 * size * 5 * 3).view(2 * size * 5, 3)
    parts = torch.cat([ContextParallel(size=size, rank=r).shard(row, dim=0) for r in range(size)])
    assert torch.equal(_to_row_order(parts, size), row)
    assert torch.equal(_to_rank_order(row, size), parts)


def test_a_row_that_does_not_cut_into_2cp_chunks_is_refused():
    with pytest.raises(ValueError, match="multiple of 8"):
        ContextParallel(size=4, rank=0).local_index(36)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("shared_prompt", [False, True])
@pytest.mark.parametrize("documents", [True, False])
def test_flex_block_masks_of_a_ranks_queries_match_the_sdpa_masks(shared_prompt, documents):
    """The GPU path (FlexAttention block masks over local queries x the whole row) agrees with the CPU
    path (SDPA boolean masks); FlexAttention's forward runs eagerly on a CPU."""
    from herd.model.attention import attend, build_attention_mask, document_block_mask, flex_attention

    if flex_attention is None:
        pytest.skip("FlexAttention needs torch >= 2.5")
    batch_ = rows(2, seed=3, shared_prompt=shared_prompt)
    document_ids = batch_["document_ids"] if documents else None
    response_ids = batch_.get("response_ids") if documents else None
    index = ContextParallel(size=2, rank=1).local_index(SEQ)
    q = torch.randn(2, 4, index.numel(), 16)
    k, v = torch.randn(2, 2, SEQ, 16), torch.randn(2, 2, SEQ, 16)
    boolean = build_attention_mask(config(), 2, index.numel(), q.device, document_ids=document_ids,
                                   response_ids=response_ids, query_index=index, kv_len=SEQ)
    blocks = document_block_mask(document_ids, response_ids, query_index=index, batch=2, kv_len=SEQ)
    with torch.no_grad():
        assert (attend(q, k, v, blocks) - attend(q, k, v, boolean)).abs().max() < 1e-5
    # rank 1 of 2 holds chunks 1 and 2 of 4: its first query is place 8, which sees no later place
    assert int(boolean[0, 0, 0].nonzero().max()) == 8


# ----------------------------------------------------------------------------- multi-process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(batch: dict[str, torch.Tensor], total: int) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Transformer(config())
    loss, n = next_token_loss(model, batch)
    (loss * n / total).backward()
    return float(loss * n / total), {name: p.grad.clone() for name, p in model.named_parameters()}


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp(min=1e-12))


def _cp_only(rank: int, world: int, shared_prompt: bool) -> dict[str, float]:
    """CP over all ranks: each rank's loss and gradients, summed over the group, against one process."""
    batch = rows(2, seed=1, shared_prompt=shared_prompt)
    total = int((batch["targets"] != IGNORE_INDEX).sum())
    want_loss, want_grads = _reference(batch, total)
    cp = ContextParallel(torch.distributed.group.WORLD)
    torch.manual_seed(0)
    model = Transformer(config())
    loss, n = next_token_loss(model, batch, context=cp)
    local = loss * n / total  # this rank's share of the row's mean
    local.backward()
    got_loss = local.detach().clone()
    torch.distributed.all_reduce(got_loss)
    errors = {"loss": abs(float(got_loss) - want_loss) / abs(want_loss)}
    for name, param in model.named_parameters():
        grad = param.grad.clone()
        torch.distributed.all_reduce(grad)
        errors[name] = _relative_error(grad, want_grads[name])
    return errors


def _cp_with_mesh(rank: int, world: int, shape: tuple[int, int, int]) -> dict[str, float]:
    """The training mesh (data x context x tensor): TP, then FSDP2 over data x context, then CP."""
    from torch.distributed.device_mesh import init_device_mesh

    from herd.stages.parallelize import apply_fsdp, apply_tensor_parallel, context_parallel, fsdp_mesh

    data, context, tensor = shape
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("data_parallel", "context_parallel", "tensor_parallel"))
    batch = rows(2 * data, seed=2)
    total = int((batch["targets"] != IGNORE_INDEX).sum())
    want_loss, want_grads = _reference(batch, total)
    dp_rank = mesh["data_parallel"].get_local_rank()
    mine = {k: v[2 * dp_rank : 2 * dp_rank + 2] for k, v in batch.items()}  # this replica's rows
    torch.manual_seed(0)
    model = Transformer(config())
    if tensor > 1:
        apply_tensor_parallel(model, mesh["tensor_parallel"])
    apply_fsdp(model, fsdp_mesh(mesh))
    loss, n = next_token_loss(model, mine, context=context_parallel(mesh))
    # FSDP2 averages the gradients over data x context: scale by its size (as herd's stages do)
    (loss * n / total * data * context).backward()
    got_loss = (loss * n / total).detach().clone()
    torch.distributed.all_reduce(got_loss)  # tensor-parallel ranks hold the same share: divide them out
    errors = {"loss": abs(float(got_loss) / tensor - want_loss) / abs(want_loss)}
    for name, param in model.named_parameters():
        errors[name] = _relative_error(param.grad.full_tensor(), want_grads[name])
    return errors


def _worker(rank: int, world: int, port: int, out: str, checks: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for name, kind, argument in checks:
            errors = _cp_only(rank, world, argument) if kind == "cp" else _cp_with_mesh(rank, world, tuple(argument))
            results[name] = max(errors.items(), key=lambda item: item[1])
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        torch.distributed.destroy_process_group()


def _run(world: int, checks: list, tmp_path: Path) -> dict[str, list]:
    torch.multiprocessing.spawn(_worker, args=(world, _free_port(), str(tmp_path), checks), nprocs=world, join=True)
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    return {name: [ranks[name] for ranks in per_rank] for name, _, _ in checks}


def _assert_close(results: dict[str, list]) -> None:
    for check, per_rank in results.items():
        for rank, (what, error) in enumerate(per_rank):
            assert error < RTOL, f"{check}, rank {rank}: {what} off by {error:.2e} relative"


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    _assert_close(_run(2, [("cp2 documents", "cp", False), ("cp2 shared prompts", "cp", True)], tmp_path))


@pytest.mark.slow
def test_four_processes_match_one_process(tmp_path):
    _assert_close(_run(4, [("cp4 documents", "cp", False), ("cp4 shared prompts", "cp", True),
                           ("cp2 x fsdp2 dp2", "mesh", [2, 2, 1]), ("cp2 x tp2", "mesh", [1, 2, 2])], tmp_path))

"""Parallelism applied to the plain backbone from outside, in the order torchtitan uses:
tensor parallel, activation checkpointing, per-block compile, then FSDP2 sharding.

The device mesh of ``strategy=fsdp2`` / ``fsdp2_tp`` / ``fsdp2_cp`` has three dimensions,
``data_parallel x context_parallel x tensor_parallel`` (each of size 1 when unused):
- tensor parallel ranks split the heads and the FFN width of every block;
- context parallel ranks split every row along the sequence (:mod:`herd.model.context`); they
  read the same rows, so the data is split by the data-parallel rank alone;
- FSDP2 shards the weights over data x context parallel (:func:`fsdp_mesh`): the gradients of a
  context-parallel group's parts of a row add up in the same reduce-scatter that averages the
  data-parallel replicas.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from herd.dtypes import FP32_BF16_OR_NULL, torch_dtype
from herd.model import Transformer
from herd.model.context import ContextParallel


def checkpoint_every(setting: str | int | None) -> int:
    """Blocks per checkpointed block: 0 for ``none``, 1 for ``full``, k for every k-th block."""
    if setting in (None, "none", 0, False):
        return 0
    if setting in ("full", True):
        return 1
    if isinstance(setting, int) and setting > 0:
        return setting
    raise ValueError(
        f"stage.activation_checkpointing={setting!r}: use none, full (every block) or a positive integer k "
        "(every k-th block)"
    )


def apply_activation_checkpointing(model: Transformer, setting: str | int | None) -> int:
    """Recompute the activations of every k-th block in the backward pass; returns how many were wrapped.

    Parameter and state-dict names are unchanged (the wrapper strips its prefix), so checkpoints
    and exports are the same with or without it.
    """
    every = checkpoint_every(setting)
    if not every:
        return 0
    wrapped = 0
    for index, block in enumerate(model.layers):
        if index % every == 0 and not _is_wrapped(block):
            model.layers[index] = checkpoint_wrapper(block)
            wrapped += 1
    return wrapped


def _is_wrapped(block: nn.Module) -> bool:
    return hasattr(block, "_checkpoint_wrapped_module")


# ------------------------------------------------------------------------------- FSDP2 and TP

def _dtype(name: str | None, key: str) -> torch.dtype | None:
    return torch_dtype(name, FP32_BF16_OR_NULL, f"stage.fsdp.{key}", "use bf16, fp32 or null")


def apply_fsdp(
    model: Transformer,
    mesh: DeviceMesh,
    *,
    param_dtype: str | None = None,
    reduce_dtype: str | None = "fp32",
    reshard_after_forward: bool = True,
) -> None:
    """FSDP2: ``fully_shard`` every block, then the root (embeddings, norm, head).

    ``param_dtype=bf16`` all-gathers and computes in bf16 while the sharded master weights stay
    fp32; gradients are reduced in ``reduce_dtype``. ``reshard_after_forward=False`` keeps the
    gathered weights from forward to backward (faster, more memory; the paper's choice).
    """
    policy = MixedPrecisionPolicy(param_dtype=_dtype(param_dtype, "param_dtype"),
                                  reduce_dtype=_dtype(reduce_dtype, "reduce_dtype"))
    last = len(model.layers) - 1
    for index, block in enumerate(model.layers):
        # The root all-gathers right after the last block's forward anyway: keep that one gathered.
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward and index < last)
    # The root (embeddings, final norm, head) stays gathered after forward: losses apply the head
    # to hidden states outside forward (chunked cross-entropy), in training and in validation.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)


def apply_tensor_parallel(model: Transformer, mesh: DeviceMesh) -> None:
    """Megatron-style tensor parallelism of every block: q/k/v and w1/w3 column-wise, wo and w2 row-wise.

    Each rank then holds n_heads / tp query heads and n_kv_heads / tp KV heads.
    """
    size = mesh.size()
    config = model.config
    if config.n_kv_heads % size or config.ffn_hidden_dim % size:
        raise ValueError(f"tensor_parallel_size={size} must divide model.n_kv_heads={config.n_kv_heads} "
                         f"and the FFN width {config.ffn_hidden_dim}")
    plan = {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(), "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(), "feed_forward.w2": RowwiseParallel()}
    for block in model.layers:
        parallelize_module(block, mesh, plan)
        block.attention.n_heads //= size
        block.attention.n_kv_heads //= size


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP2 shards over: data parallel, or data x context parallel flattened into one dimension."""
    names = mesh.mesh_dim_names or ()
    if "context_parallel" not in names or mesh["context_parallel"].size() == 1:
        return mesh["data_parallel"]
    return mesh["data_parallel", "context_parallel"]._flatten("data_context_parallel")


def context_parallel(mesh: DeviceMesh | None) -> ContextParallel | None:
    """The context-parallel group of this rank (None without a mesh, or when its size is 1)."""
    if mesh is None or "context_parallel" not in (mesh.mesh_dim_names or ()):
        return None
    group = mesh["context_parallel"]
    return ContextParallel(group.get_group()) if group.size() > 1 else None


def compile_blocks(model: Transformer) -> None:
    """``torch.compile`` each block on its own (keeps compile time and graph breaks local)."""
    for index, block in enumerate(model.layers):
        model.layers[index] = torch.compile(block)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter is a DTensor (FSDP2, tensor parallel): a forward then needs every rank."""
    return any(isinstance(param, DTensor) for param in model.parameters())


def local_parameter_count(model: nn.Module) -> int:
    """Elements of the parameters this rank holds (its shards, for DTensors)."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        total += local.numel()
    return total


def fsdp1_strategy(**kwargs):
    """Lightning's FSDPStrategy wrapping each transformer block (``strategy=fsdp``, GPU only)."""
    from lightning.pytorch.strategies import FSDPStrategy

    from herd.model.transformer import TransformerBlock

    return FSDPStrategy(auto_wrap_policy={TransformerBlock}, activation_checkpointing_policy=None, **kwargs)


def _model_parallel_strategy_class():
    from lightning.pytorch.strategies import ModelParallelStrategy

    from herd.stages import checkpoint_io

    class DataParallelByDefault(ModelParallelStrategy):
        """ModelParallelStrategy with a context-parallel dimension, whose ``data_parallel_size="auto"`` is
        every rank not used for tensor or context parallelism, and whose sharded checkpoints are atomic and
        read safely.

        (Lightning's own "auto" means one data-parallel group per node.) The mesh is
        ``data_parallel x context_parallel x tensor_parallel`` (see the module docstring): context-parallel
        ranks of one group are neighbours, and tensor-parallel ranks the closest (one node's GPUs).

        Sharded checkpoints (``save_distributed_checkpoint=True``):
        - every rank writes into ``<name>.tmp-step<global_step>``; after a barrier rank 0 publishes it
          (``checkpoint_io.publish_checkpoint``), so ``<name>`` is always a complete checkpoint, the
          previous one or the new one, whatever moment a rank is killed at;
        - deleting one (``save_top_k``) renames it away first, so no half-deleted folder keeps its name;
        - the leftovers of killed saves are cleaned by the train entry point before training;
        - resuming reads ``.metadata``, the non-tensor items and ``meta.pt`` with restricted unpicklers
          (``checkpoint_io.load_sharded``), never with a full pickle.
        """

        def __init__(self, *args, context_parallel_size: int = 1, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            if not isinstance(context_parallel_size, int) or context_parallel_size < 1:
                raise ValueError(f"strategy.context_parallel_size must be a positive integer, got "
                                 f"{context_parallel_size!r}")
            self._context_parallel_size = context_parallel_size
            self._active_context = context_parallel_size  # ranks sharing a row now (a divisor of the above)
            self._contexts: dict[int, ContextParallel | None] = {}

        @property
        def context_parallel_size(self) -> int:
            """The mesh's context-parallel dimension (``strategy.context_parallel_size``)."""
            return self._context_parallel_size

        @property
        def active_context_parallel_size(self) -> int:
            """How many ranks share each row now: the mesh's size, or the divisor a context stage chose."""
            return self._active_context

        def use_context_parallel(self, size: int | None) -> None:
            """Let ``size`` ranks share each row from now on (None: the mesh's size); every rank calls this.

            ``size`` divides ``context_parallel_size``; the ranks of a context-parallel group that no
            longer share a row read different rows instead (they become data-parallel replicas, see
            :attr:`distributed_sampler_kwargs`), so a stage of short rows wastes no rank.
            """
            size = self._context_parallel_size if size is None else size
            if not isinstance(size, int) or size < 1 or self._context_parallel_size % size:
                raise ValueError(f"context_parallel={size!r} must be a positive divisor of strategy."
                                 f"context_parallel_size={self._context_parallel_size}")
            self._active_context = size
            self.active_context_parallel()  # a new group is made now, while every rank is here

        def active_context_parallel(self) -> ContextParallel | None:
            """The group this rank shares its rows with now (None: it computes whole rows)."""
            size = self._active_context
            if self._device_mesh is None or size == 1:
                return None
            if size not in self._contexts:  # a collective: every rank gets here in the same order
                self._contexts[size] = self._context_group(size)
            return self._contexts[size]

        def _context_group(self, size: int) -> ContextParallel:
            mesh = self._device_mesh
            if size == self._context_parallel_size:
                return context_parallel(mesh)
            ranks = mesh.mesh  # (data, context, tensor) global ranks
            mine = None
            for data in range(ranks.shape[0]):
                for tensor in range(ranks.shape[2]):
                    for block in range(ranks.shape[1] // size):
                        members = ranks[data, block * size : (block + 1) * size, tensor].tolist()
                        group = torch.distributed.new_group(members)  # every rank creates every group
                        if self.global_rank in members:
                            mine = ContextParallel(group)
            return mine

        @property
        def distributed_sampler_kwargs(self) -> dict[str, int]:
            """The data-parallel rank and replicas: context-parallel ranks that share rows read the same ones."""
            mesh = self.device_mesh
            split = self._context_parallel_size // self._active_context
            context_rank = mesh["context_parallel"].get_local_rank()
            return {"num_replicas": mesh["data_parallel"].size() * split,
                    "rank": mesh["data_parallel"].get_local_rank() * split + context_rank // self._active_context}

        def setup_environment(self) -> None:
            from torch.distributed.device_mesh import init_device_mesh

            tensor, context = self._tensor_parallel_size, self._context_parallel_size
            if tensor == "auto":
                tensor = self.num_processes
            if self._data_parallel_size == "auto":
                if self.world_size % (tensor * context):
                    raise ValueError(f"tensor_parallel_size={tensor} x context_parallel_size={context} does not divide "
                                     f"the world size {self.world_size} (trainer.devices x trainer.num_nodes)")
                self._data_parallel_size = self.world_size // (tensor * context)
            self._tensor_parallel_size = tensor
            data = self._data_parallel_size
            if data * context * tensor != self.world_size:
                raise ValueError(f"data_parallel_size={data} x context_parallel_size={context} x tensor_parallel_size="
                                 f"{tensor} must equal the world size {self.world_size} (trainer.devices x "
                                 "trainer.num_nodes)")
            super(ModelParallelStrategy, self).setup_environment()  # the process group, as Lightning's does
            self._setup_distributed()
            self._device_mesh = init_device_mesh(
                self.root_device.type, (data, context, tensor),
                mesh_dim_names=("data_parallel", "context_parallel", "tensor_parallel"))
            self.lightning_module._device_mesh = self._device_mesh

        def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
            if not self._save_distributed_checkpoint or storage_options is not None or "://" in str(filepath):
                return super().save_checkpoint(checkpoint, filepath, storage_options)
            target = Path(self.broadcast(str(filepath)))
            temporary = checkpoint_io.sharded_temporary(target, self.broadcast(int(checkpoint.get("global_step", 0))))
            if self.is_global_zero and (temporary.exists() or temporary.is_symlink()):
                checkpoint_io.discard_checkpoint(temporary)  # left by a save killed at this same step
            self.barrier()
            super().save_checkpoint(checkpoint, temporary)  # shards from every rank, meta.pt from rank 0
            self.barrier()  # every rank has finished writing
            if self.is_global_zero:
                checkpoint_io.publish_checkpoint(temporary, target)

        def remove_checkpoint(self, filepath) -> None:
            if "://" in str(filepath):
                super().remove_checkpoint(filepath)
            elif self.is_global_zero:
                checkpoint_io.discard_checkpoint(filepath)

        def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
            path = Path(self.broadcast(str(checkpoint_path)))
            if not path.is_dir():
                return super().load_checkpoint(path, weights_only=True)
            return _load_sharded_into(self, path)

    return DataParallelByDefault


def _load_sharded_into(strategy, path: Path) -> dict:
    """Load a sharded checkpoint into the strategy's model and optimizers (every rank calls it).

    Mirrors Lightning's ModelParallelStrategy.load_checkpoint for folders, with safe readers;
    returns the non-tensor entries (meta.pt) for Lightning to restore loops, callbacks and schedulers.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    from herd.stages import checkpoint_io

    module = strategy.model
    module_state = {"state_dict": get_model_state_dict(module)}
    checkpoint_io.load_sharded(module_state, path)
    module.load_state_dict(module_state["state_dict"], strict=strategy.lightning_module.strict_loading)
    for index, optimizer in enumerate(strategy.optimizers):
        key = f"optimizer_{index}"
        optimizer_state = {key: get_optimizer_state_dict(module, optimizer)}
        checkpoint_io.load_sharded(optimizer_state, path)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=optimizer_state[key],
                                 options=StateDictOptions(cpu_offload=True))
    return torch.load(path / checkpoint_io.SHARDED_META, map_location="cpu", weights_only=True)


def model_parallel_strategy(**kwargs):
    """Lightning's ModelParallelStrategy for ``strategy=fsdp2`` / ``fsdp2_tp`` (see DataParallelByDefault)."""
    return _model_parallel_strategy_class()(**kwargs)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU, names without wrapper prefixes.

    For a sharded model this is a collective: every rank must call it; rank 0 gets the weights,
    the other ranks an empty dict.
    """
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def grad_norm(parameters) -> torch.Tensor:
    """Global L2 norm of the gradients, also when they are DTensors on different meshes (FSDP2 + TP)."""
    groups: dict[object, list[torch.Tensor]] = {}
    for param in parameters:
        if param.grad is not None:
            grad = param.grad
            groups.setdefault(grad.device_mesh if isinstance(grad, DTensor) else None, []).append(grad)
    squares = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):  # reduces over the shards
            norm = norm.full_tensor()
        squares.append(norm.float() ** 2)
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())


def scale_grads(parameters, factor: float) -> None:
    """Multiply every gradient in place (clipping)."""
    for param in parameters:
        if param.grad is not None:
            param.grad.mul_(factor)


def shard_adapter_model(model: nn.Module, units: Sequence[nn.Module], mesh: DeviceMesh, *,
                        param_dtype: str | None = None, reduce_dtype: str | None = "fp32",
                        reshard_after_forward: bool = True) -> None:
    """FSDP2: ``fully_shard`` each of ``units`` (blocks of the backbone and the adapter), then the whole model.

    The root keeps what no unit holds (embeddings, norms, heads, projections). It stays gathered
    after forward, because the adapter stages apply the head outside forward.
    """
    policy = MixedPrecisionPolicy(param_dtype=_dtype(param_dtype, "param_dtype"),
                                  reduce_dtype=_dtype(reduce_dtype, "reduce_dtype"))
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)

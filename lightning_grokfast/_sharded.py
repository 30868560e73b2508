"""Parameters sharded as DTensors (FSDP2's ``fully_shard``, tensor parallelism): their local pieces, sums over all
pieces, and each state tensor as a whole. Plain PyTorch.

The filters are elementwise, so each rank filters its own piece of every gradient and keeps the state of that piece
only. What needs the whole tensor, a norm or a dot product, is summed over the pieces: each rank's partial sums,
divided by the number of ranks that hold the same piece (its replicas), are added up by an all-reduce, so every rank
gets the sum one process would compute. A step takes one (the non-finite verdict, and ⊥Grad's dot products); ⊥Grad
a second, for the norms of its projections; the statistics of a logging step one more.
"""

from __future__ import annotations

import math
from typing import Any, Optional, TypeGuard

import torch
from torch import Tensor

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # a torch build without distributed support: nothing can be sharded
    DTensor = None  # type: ignore[assignment,misc]

try:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # torch < 2.5
    from torch.distributed._tensor._utils import (  # type: ignore[import-not-found,no-redef]
        compute_local_shape_and_global_offset,
    )


def is_sharded(tensor: Any) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a DTensor."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """This rank's piece of ``tensor``: under ``no_grad``, a DTensor's own local tensor; ``tensor`` itself if it is
    not a DTensor."""
    return tensor.to_local() if is_sharded(tensor) else tensor


class Sharding:
    """Per DTensor parameter: its device mesh, placements and shape, and how many ranks hold each of its pieces.

    Sums run over the default process group: every rank of it steps the transform, as under Lightning's
    ``ModelParallelStrategy`` or Fabric's. A piece of a parameter on a mesh of a part of the ranks (a data-parallel
    sub-mesh of a 2-D one, say) is held by ``world size / number of pieces`` ranks; a parameter that is not a
    DTensor, by all of them.

    Raises:
        ValueError: for a parameter with a ``Partial`` placement.
    """

    def __init__(self, params: dict[str, Tensor]) -> None:
        sharded = {name: p for name, p in params.items() if is_sharded(p)}
        self.meshes = {name: p.device_mesh for name, p in sharded.items()}
        self.placements = {name: tuple(p.placements) for name, p in sharded.items()}
        self.shapes = {name: tuple(p.shape) for name, p in sharded.items()}
        world = dist.get_world_size()
        self.replicas: dict[str, float] = {}
        for name in params:
            placements = self.placements.get(name, ())
            if any(pl.is_partial() for pl in placements):
                raise ValueError(f"Parameter {name!r} has a Partial placement; shard or replicate it.")
            pieces = math.prod(self.meshes[name].size(i) for i, pl in enumerate(placements) if pl.is_shard())
            self.replicas[name] = world / pieces

    def weights(self, names: list[str], device: torch.device) -> Tensor:
        """``1 / replicas`` of each parameter of ``names``: what makes a sum over all ranks count each piece once."""
        return torch.tensor([1.0 / self.replicas[n] for n in names], dtype=torch.float64, device=device)

    def sum(self, values: Tensor) -> Tensor:
        """``values`` summed over every rank, in place (one all-reduce)."""
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def _layout(self, name: str, value: Tensor) -> tuple[tuple[Any, ...], tuple[int, ...]]:
        """The placements and global shape of a state tensor of ``name`` (its parameter's, after leading dims)."""
        lead = value.dim() - len(self.shapes[name])
        placements = tuple(Shard(pl.dim + lead) if isinstance(pl, Shard) else pl for pl in self.placements[name])
        return placements, (*value.shape[:lead], *self.shapes[name])

    def dtensor(self, name: str, value: Tensor) -> Tensor:  # a DTensor, or ``value`` for an unsharded parameter
        """This rank's piece ``value`` of a state tensor of ``name``, as the DTensor of the whole."""
        if name not in self.placements:
            return value
        placements, shape = self._layout(name, value)
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(value, self.meshes[name], placements, shape=torch.Size(shape), stride=stride)

    def whole(self, name: str, value: Tensor) -> Tensor:
        """The whole of a state tensor of ``name`` whose piece on this rank is ``value``, on CPU (a collective:
        every rank calls it, in the same order)."""
        whole = self.dtensor(name, value)
        return (whole.full_tensor() if is_sharded(whole) else whole).cpu()

    def piece(self, name: str, value: Tensor) -> Tensor:
        """This rank's piece of a whole state tensor ``value`` of ``name`` (a copy; no communication)."""
        if name not in self.placements:
            return value.clone()
        placements, shape = self._layout(name, value)
        sizes, offsets = compute_local_shape_and_global_offset(torch.Size(shape), self.meshes[name], placements)
        return value[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].clone()


def sharding_of(params: dict[str, Tensor]) -> Optional[Sharding]:
    """The :class:`Sharding` of ``params`` if any of them is a DTensor, else ``None``."""
    return Sharding(params) if any(is_sharded(p) for p in params.values()) else None

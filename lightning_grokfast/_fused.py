"""Fused kernels: a group's update as one ``torch.compile``d graph (inductor), one pass over gradient and state.

A kernel is a plain PyTorch function over lists of tensors of one device and dtype; :func:`run` compiles it once
per shape of its inputs (``fullgraph=True``, no dynamic shapes) and calls it on chunks of at most :data:`CHUNK`
tensors, so that a graph stays small to compile and a model of many alike layers reuses one graph for all of them.
Values that change from step to step (an MA scale, a ring position) are tensors or views, never Python numbers, so
that they never cause a recompilation.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor

CHUNK = 32  # tensors a graph takes at most
RECOMPILE_LIMIT = 64  # graphs a kernel may build (torch's default, 8, would soon fall back to eager)
_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # torch < 2.6


@functools.cache
def unavailable(device: torch.device) -> Optional[str]:
    """Why fused kernels cannot be built for ``device`` here; ``None`` if they can."""
    if device.type == "cpu":
        compilers = [torch._inductor.config.cpp.cxx[1] or "", "g++", "c++", "clang++"]
        if not any(shutil.which(c) for c in compilers if c):
            return "torch.compile needs a C++ compiler (g++ or clang++) on the PATH to build CPU kernels"
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "torch.compile needs Triton to build CUDA kernels (pip install triton)"
    return f"torch.compile's fused kernels are built for CPU and CUDA tensors, not {device.type}"


@functools.cache
def _compiled(kernel: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(kernel, fullgraph=True, dynamic=False)


def run(kernel: Callable[..., Any], lists: tuple[list[Any], ...], vectors: tuple[Tensor, ...], *scalars: Any) -> Any:
    """``kernel(*lists, *vectors, *scalars)`` compiled, on chunks of :data:`CHUNK` tensors: ``lists`` hold one item per
    tensor, ``vectors`` one value per tensor; the kernel's results (one row per tensor, or ``None``) are joined.

    Raises:
        RuntimeError: if torch.compile cannot build the kernel, with its reason.
    """
    compiled, n, rows = _compiled(kernel), len(lists[0]), []
    for start in range(0, n, CHUNK):
        part = slice(start, min(start + CHUNK, n))
        try:
            with torch._dynamo.config.patch({_LIMIT: RECOMPILE_LIMIT}):
                rows.append(compiled(*(items[part] for items in lists), *(v[part] for v in vectors), *scalars))
        except Exception as err:  # torch.compile's own errors are of many kinds
            raise RuntimeError(f"fused=True: torch.compile could not build or run the fused kernel: {err}") from err
    return None if rows[0] is None else torch.cat(rows)

"""The transforms on parameters sharded by FSDP2 (``fully_shard``) over 1 and 2 processes (gloo, CPU): the filter
state each rank holds, and what a step costs, with the share of its all-reduces.

Models: the example's transformer (423k parameters, each block a unit) and a 16.8M-parameter MLP (4 x
``Linear(2048, 2048)``, each layer a unit). Each process: one torch thread; one backward makes the gradients
(DTensors), then each transform's ``step`` is timed on them (wall clock: the ranks wait for each other in the
all-reduce), as are its all-reduces alone: every transform's first (the non-finite verdict and, for ⊥Grad, three sums
per tensor), and ⊥Grad's second (the norms of the projections, one value per tensor); float64.
Run: ``python benchmarks/sharded.py [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.autograd.graph import increment_version
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils import benchmark

from lightning_grokfast import EMAFilter, MAFilter, OrthoGrad

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the examples, as a script sees them
from modular_arithmetic import Transformer


def models(quick: bool) -> dict[str, tuple[nn.Module, list[nn.Module], torch.Tensor]]:
    """Per model: the module, its FSDP units, an input batch."""
    torch.manual_seed(0)
    tr = Transformer(99, 128, 2, 4, max_len=4)
    width = 256 if quick else 2048
    mlp = nn.Sequential(*(nn.Linear(width, width) for _ in range(4)))
    return {"transformer": (tr, list(tr.blocks), torch.randint(0, 99, (8, 4))),
            "wide-mlp": (mlp, list(mlp), torch.randn(8, width))}  # fmt: skip


def worker(rank: int, world: int, port: int, quick: bool, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    results: dict[str, Any] = {}
    for name, (model, units, x) in models(quick).items():
        for unit in units:
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        model(x).float().square().mean().backward()
        grads = [p.grad.to_local() for p in model.parameters()]
        row: dict[str, Any] = {"tensors": len(grads)}
        for kind, transform in (("EMA", EMAFilter(model.named_parameters(), 0.98, 1e-6)),
                                ("MA w10", MAFilter(model.named_parameters(), 10, 1e-6)),
                                ("OrthoGrad", OrthoGrad(model.named_parameters()))):  # fmt: skip
            for _ in range(10):  # fill the MA window; warm up
                increment_version(grads)
                transform.step()
            timer = benchmark.Timer("new(g); t.step()", globals={"new": increment_version, "g": grads, "t": transform})
            row[f"{kind} step s"] = timer.timeit(20 if quick else 100).median
            row[f"{kind} state bytes"] = transform.state_bytes()
        sizes = {"all-reduce, first (OrthoGrad's) s": 2 + 3 * len(grads), "all-reduce, second s": len(grads)}
        for key, size in sizes.items():
            vector = torch.zeros(size, dtype=torch.float64)
            row[key] = benchmark.Timer("f(v)", globals={"f": dist.all_reduce, "v": vector}).timeit(100).median
        results[name] = row
        dist.barrier()
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def run(world: int, quick: bool) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(worker, args=(world, port, quick, queue), nprocs=world, start_method="spawn")
    return queue.get()


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a small MLP and fewer timings (a smoke run)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)
    data = {"machine": {"torch": torch.__version__, "cpu_count": os.cpu_count()}, "quick": args.quick}
    data["processes"] = {str(world): run(world, args.quick) for world in (1, 2)}
    one, two = data["processes"]["1"], data["processes"]["2"]
    for name in one:
        print(f"\n== {name} ({one[name]['tensors']} tensors) ==")
        print(f"  {'':38}{'1 process':>14}{'2 processes':>14}{'2 / 1':>8}")
        for key in one[name]:
            if key == "tensors":
                continue
            a, b = one[name][key], two[name][key]
            scale, unit = (1e3, "ms") if key.endswith(" s") else (1 / 1024, "KiB")
            ratio = f"{b / a:8.2f}" if a else ""
            print(f"  {key.removesuffix(' s') + ' (' + unit + ')':38}{a * scale:14.3f}{b * scale:14.3f}{ratio}")
        reduces = two[name]["all-reduce, first (OrthoGrad's) s"] + two[name]["all-reduce, second s"]
        print(f"  the all-reduces' share of ⊥Grad's step on 2 processes: {reduces / two[name]['OrthoGrad step s']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return data


if __name__ == "__main__":
    main()

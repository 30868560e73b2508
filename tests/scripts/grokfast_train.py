"""Train a tiny model with ``GrokfastCallback``; the subprocess half of ``tests/test_distributed_resume.py``.

Run it as a script::

    python grokfast_train.py OUT [--devices 2] --job DIR:KIND:MODE [--job ...]

Every job trains a small regression MLP with SGD (momentum) on generated data for ``--max-steps`` optimizer
steps with ``GrokfastCallback`` of ``KIND`` (``ema`` or ``ma``, see ``FILTER_CONFIGS``), checkpointing every
``--every`` steps into ``OUT/DIR/ckpt`` (``ModelCheckpoint(save_last=True)``). ``--every`` global batches make
one epoch, so every checkpoint falls on an epoch boundary and the plain dataloader resumes exactly. ``MODE`` is
``full`` (train from scratch), ``resume`` (``fit(ckpt_path="last")`` from ``OUT/DIR/ckpt``) or ``hang``
(train from scratch; at the end of step ``--hang-at-step`` write ``OUT/DIR/hung_rank{r}`` and sleep until the
test SIGKILLs the process group: a crash that leaves no chance to clean up). Jobs run one after the other in
this process, which saves the start-up time of a process per run; a ``hang`` job must come last.

With ``--devices 2`` it runs DDP on CPU (gloo, ``strategy="ddp"``: Lightning re-runs this script for rank 1,
and the later jobs reuse the process group). The global batch is split over the ranks by an interleaving
``DistributedSampler`` (no shuffling), so the ranks see different samples and their union is the batch that
a single process sees.

Files written under ``OUT/DIR``, per rank ``r``:

* ``final_rank{r}.pt``: after ``fit``: the model's and the filter's state dicts, the sample indices the rank saw
  at each step, the global step and how many ``torch.distributed`` calls the Grokfast hook made.
* ``restored_rank{r}.pt`` (``resume``): the filter state as restored from the checkpoint, taken in
  ``on_train_start``.
* ``hung_rank{r}`` (``hang``), ``ckpt/`` (the checkpoints) and ``logs/`` (the CSV log).
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_grokfast import GrokfastCallback

GLOBAL_BATCH = 8
HANG_LIMIT_S = 600.0
IN_FEATURES = 6
OUT_FEATURES = 2
FILTER_CONFIGS: dict[str, dict[str, Any]] = {
    "ema": {"filter": "ema", "alpha": 0.8, "lamb": 2.0},
    # window 4 with checkpoints every 3 steps: at the step-6 checkpoint the ring has wrapped and sits mid-way.
    "ma": {"filter": "ma", "window_size": 4, "lamb": 1.5},
}
_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "irecv",
    "isend",
    "recv",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "send",
)


class IndexedRegression(Dataset[tuple[int, Tensor, Tensor]]):
    """``n`` fixed samples ``(index, x, y)`` from a seeded generator (the same in every process)."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, IN_FEATURES, generator=g)
        self.y = torch.randn(n, OUT_FEATURES, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[int, Tensor, Tensor]:
        return i, self.x[i], self.y[i]


class Regressor(L.LightningModule):
    """A small MLP trained with SGD (momentum, so the optimizer has state to restore too)."""

    def __init__(self, batches_per_epoch: int) -> None:
        super().__init__()
        self.batches_per_epoch = batches_per_epoch
        self.net = nn.Sequential(nn.Linear(IN_FEATURES, 16), nn.Tanh(), nn.Linear(16, OUT_FEATURES))
        self.seen: list[list[int]] = []

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        index, x, y = batch
        self.seen.append([int(i) for i in index])
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        # Lightning's own DistributedSampler would shuffle; this one interleaves: rank r gets r, r + 2, ...
        world, rank = self.trainer.world_size, self.trainer.global_rank
        dataset = IndexedRegression(GLOBAL_BATCH * self.batches_per_epoch)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=GLOBAL_BATCH // world, sampler=sampler)


class Hang(Callback):
    """At the end of step ``step``, write ``out/hung_rank{r}`` and sleep until killed (at most ``HANG_LIMIT_S``)."""

    def __init__(self, out: Path, step: int) -> None:
        self.out = out
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            (self.out / f"hung_rank{trainer.global_rank}").write_text(str(trainer.global_step))
            time.sleep(HANG_LIMIT_S)
            os._exit(3)  # nobody killed us (the test runner died?): do not linger


class SaveRestored(Callback):
    """Save the Grokfast filter state as it is when training starts (after a resume restored it)."""

    def __init__(self, out: Path, grokfast: GrokfastCallback) -> None:
        self.out = out
        self.grokfast = grokfast

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.grokfast.grad_filter is not None
        torch.save(self.grokfast.grad_filter.state_dict(), self.out / f"restored_rank{trainer.global_rank}.pt")


class CollectiveCounter:
    """Count the ``torch.distributed`` calls made while a watched Grokfast hook runs.

    Wraps the ``torch.distributed`` communication functions once per process; :meth:`watch` makes a callback's
    ``on_before_optimizer_step`` count the calls made inside it.
    """

    def __init__(self) -> None:
        self.count = 0
        self._inside = False
        for name in _COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self._counted(getattr(dist, name)))

    def _counted(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._inside:
                self.count += 1
            return fn(*args, **kwargs)

        return wrapper

    def watch(self, grokfast: GrokfastCallback) -> None:
        """Count the calls made inside ``grokfast.on_before_optimizer_step`` from now on."""
        hook = grokfast.on_before_optimizer_step

        def watched(*args: Any, **kwargs: Any) -> None:
            self._inside = True
            try:
                hook(*args, **kwargs)
            finally:
                self._inside = False

        grokfast.on_before_optimizer_step = watched  # type: ignore[method-assign]


def run_job(out: Path, kind: str, mode: str, args: argparse.Namespace, counter: CollectiveCounter) -> None:
    """Train one job and write its files into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(0, verbose=False)
    grokfast = GrokfastCallback(**FILTER_CONFIGS[kind])
    counter.count = 0
    counter.watch(grokfast)
    checkpoint = ModelCheckpoint(dirpath=out / "ckpt", save_last=True, every_n_train_steps=args.every)
    callbacks: list[Callback] = [grokfast, checkpoint]
    if mode == "hang":
        callbacks.append(Hang(out, args.hang_at_step))
    if mode == "resume":
        callbacks.append(SaveRestored(out, grokfast))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.max_steps,
        callbacks=callbacks,
        logger=CSVLogger(out / "logs", name="", version=0),
        log_every_n_steps=2,  # the hook's diagnostics code runs on every other step
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        use_distributed_sampler=False,
    )
    model = Regressor(batches_per_epoch=args.every)
    trainer.fit(model, ckpt_path="last" if mode == "resume" else None)

    assert grokfast.grad_filter is not None
    final = {
        "model": model.state_dict(),
        "filter": grokfast.grad_filter.state_dict(),
        "seen": model.seen,
        "global_step": trainer.global_step,
        "collectives": counter.count,
    }
    torch.save(final, out / f"final_rank{trainer.global_rank}.pt")


def main() -> None:
    """Parse the arguments and run the jobs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--job", action="append", required=True, help="DIR:KIND:MODE, MODE in full|resume|hang")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3, help="checkpoint every N steps; also the epoch length")
    parser.add_argument("--hang-at-step", type=int, default=8)
    args = parser.parse_args()
    jobs = [job.split(":") for job in args.job]
    for i, job in enumerate(jobs):
        if len(job) != 3 or job[1] not in FILTER_CONFIGS or job[2] not in ("full", "resume", "hang"):
            parser.error(f"bad --job {args.job[i]!r}")
        if job[2] == "hang" and i != len(jobs) - 1:
            parser.error("a hang job must come last")
    torch.set_num_threads(1)
    counter = CollectiveCounter()
    for name, kind, mode in jobs:
        run_job(args.out / name, kind, mode, args, counter)


if __name__ == "__main__":
    main()

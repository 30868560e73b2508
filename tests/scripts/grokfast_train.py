"""The subprocess half of ``tests/test_distributed_resume.py``: ``python grokfast_train.py OUT DEVICES JOB...``.

Each ``JOB`` is ``DIR:KIND:MODE``, run one after the other in this process: ``TinyModel`` trained for
``MAX_STEPS`` with ``GrokfastCallback(**CONFIGS[KIND])``, a checkpoint every ``EVERY`` steps (one epoch) into
``OUT/DIR/ckpt``. ``MODE`` is ``full`` (from scratch), ``resume`` (``ckpt_path="last"``) or ``crash`` (from
scratch; at the end of step ``CRASH_AT`` the run SIGKILLs its own process group, the ranks included: a crash that
leaves no chance to clean up; it must come last, and the caller must start this script in a session of its own).
``DEVICES=2`` runs DDP on CPU (gloo); the interleaving sampler gives each rank other samples of the global batch.

Written per rank ``r`` into ``OUT/DIR``: ``final_rank{r}.pt`` (model and filter state, the sample indices seen
at each step, the global step and the ``torch.distributed`` calls made inside the Grokfast hook) and, on resume,
``restored_rank{r}.pt`` (the filter state as restored, at ``on_train_start``).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import TinyModel, make_trainer

from lightning_grokfast import GrokfastCallback

MAX_STEPS, EVERY, CRASH_AT, BATCH = 12, 3, 8, 8
CONFIGS: dict[str, dict[str, Any]] = {
    "ema": {"filter": "ema", "alpha": 0.8, "lamb": 2.0},
    "ma": {"filter": "ma", "window_size": 4, "lamb": 1.5},  # at the step-6 checkpoint the ring sits mid-way
}
COLLECTIVES = ("all_", "barrier", "broadcast", "gather", "irecv", "isend", "recv", "reduce", "scatter", "send")


class Indexed(TinyModel):
    """TinyModel whose batches carry their sample indices, recorded in :attr:`seen`; rank r gets r, r + 2, ..."""

    def __init__(self) -> None:
        super().__init__(samples=BATCH * EVERY)
        self.seen: list[list[int]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch[0].tolist())
        return super().training_step(batch[1:], batch_idx)

    def train_dataloader(self) -> DataLoader:
        data = TensorDataset(torch.arange(len(self.data)), *self.data.tensors)
        sampler = DistributedSampler(data, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
        return DataLoader(data, batch_size=BATCH // self.trainer.world_size, sampler=sampler)


class Probe(Callback):
    """Counts the ``torch.distributed`` calls made inside ``grokfast``'s hook; saves the restored state; crashes."""

    calls, inside = 0, False

    def __init__(self, out: Path, grokfast: GrokfastCallback, mode: str) -> None:
        self.out, self.grokfast, self.mode = out, grokfast, mode
        hook = grokfast.on_before_optimizer_step

        def watched(*args: Any) -> None:
            Probe.inside = True
            try:
                hook(*args)
            finally:
                Probe.inside = False

        grokfast.on_before_optimizer_step = watched  # type: ignore[method-assign]

    @staticmethod
    def counted(fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            Probe.calls += Probe.inside
            return fn(*args, **kwargs)

        return wrapper

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.mode == "resume":
            torch.save(self.grokfast.transform.state_dict(), self.out / f"restored_rank{trainer.global_rank}.pt")

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if self.mode == "crash" and trainer.global_step == CRASH_AT:
            os.killpg(os.getpgrp(), signal.SIGKILL)


def main(out: Path, devices: int, jobs: list[str]) -> None:
    torch.set_num_threads(1)
    for name in [n for n in dir(dist) if n.startswith(COLLECTIVES) and callable(getattr(dist, n))]:
        setattr(dist, name, Probe.counted(getattr(dist, name)))
    for job in jobs:
        name, kind, mode = job.split(":")
        (out / name).mkdir(parents=True, exist_ok=True)
        seed_everything(0, verbose=False)
        grokfast, Probe.calls = GrokfastCallback(**CONFIGS[kind]), 0
        probe = Probe(out / name, grokfast, mode)
        trainer = make_trainer(
            out / name,
            [grokfast, ModelCheckpoint(out / name / "ckpt", save_last=True, every_n_train_steps=EVERY), probe],
            MAX_STEPS,
            devices=devices,
            strategy="ddp" if devices > 1 else "auto",
            logger=CSVLogger(out / name / "logs"),
            log_every_n_steps=2,  # the hook's diagnostics code runs on every other step
            enable_checkpointing=True,
            deterministic=True,
            use_distributed_sampler=False,
        )
        model = Indexed()
        trainer.fit(model, ckpt_path="last" if mode == "resume" else None)
        final = {"model": model.state_dict(), "filter": grokfast.transform.state_dict(), "seen": model.seen}
        final.update(global_step=trainer.global_step, collectives=Probe.calls)
        torch.save(final, out / name / f"final_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])

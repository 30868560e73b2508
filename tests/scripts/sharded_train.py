"""The subprocess half of ``tests/test_sharded.py``: ``python sharded_train.py OUT DEVICES LAYOUT JOB...``.

``LAYOUT`` is ``fsdp`` (FSDP2's ``fully_shard`` over a data-parallel mesh of ``DEVICES`` processes, each on its half
of every global batch) or ``tp`` (tensor parallel over 2 processes: a 2-D mesh, data parallel 1 x tensor parallel 2,
each process on the whole batch). Each ``JOB`` is ``NAME:TRANSFORM:MODE``, run one after the other in these
processes: ``TRANSFORM`` is ``ema``, ``ma`` or ``orthograd`` (with its callback); ``MODE`` is ``full`` (``STEPS``
steps), ``full-dcp`` / ``full-file`` (the same, with a checkpoint at the end of every epoch, distributed or one file),
``resume-SRC`` (from job ``SRC``'s checkpoint of step ``SAVED`` to ``STEPS``) or ``nan`` (``full``, with a NaN in
rank 1's piece of a gradient at step ``NAN_AT``). Every rank writes ``OUT/NAME/rank{r}.pt``: the weights and the
callback's state dict, gathered; the bytes of its own state; its skipped steps; the diagnostics it logged and the
batches it saw, by step. ``LAYOUT`` ``fabric`` runs the plain transforms instead, ``EMAFilter`` then ``OrthoGrad``,
in a Lightning Fabric loop over the FSDP2 model (no jobs). The checkpoints are taken by ``every_n_train_steps`` at
epoch ends: resumed from one taken by ``save_on_train_epoch_end=True``, this strategy's loop trains one batch twice.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_grokfast import EMAFilter, GrokfastCallback, OrthoGrad, OrthoGradCallback

STEPS, SAVED, NAN_AT, BATCH = 12, 8, 5, 8  # 4 steps an epoch: the checkpoint of step 8 ends an epoch
CONFIGS: dict[str, dict[str, Any]] = {"ema": {"alpha": 0.8, "lamb": 2.0}, "ma": {"filter": "ma", "window_size": 3}}


def callback(kind: str) -> Callback:
    return OrthoGradCallback() if kind == "orthograd" else GrokfastCallback(**CONFIGS[kind])


class Net(nn.Module):
    """Uneven pieces on 2 ranks: ``b`` (3 rows) splits 2 + 1, ``scale`` (1 value) 1 + 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)
        self.scale, self.gain = nn.Parameter(torch.ones(1)), nn.Parameter(0.1 * torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.b(torch.tanh(self.a(x))) * self.gain[0] + self.gain[1:4]  # b's output: whole on a rank


class Sharded(L.LightningModule):
    """``Net`` on generated regression data; ``layout`` as in the module docstring, ``None``: not sharded."""

    def __init__(self, layout: str | None = None, nan_at: int | None = None) -> None:
        super().__init__()
        self.net, self.layout, self.nan_at, self.seen = Net(), layout, nan_at, []
        gen = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(32, 4, generator=gen), torch.randn(32, 3, generator=gen)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        if self.layout == "tp":
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            plan = {"a": ColwiseParallel(), "b": RowwiseParallel()}
            parallelize_module(self.net, self.device_mesh["tensor_parallel"], plan)
        if self.layout is not None:
            for module in (self.net.a, self.net.b, self.net):
                fully_shard(module, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen.append((batch_idx, round(float(batch[0].sum()), 4)))
        return nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def on_after_backward(self) -> None:
        if self.trainer.global_step == self.nan_at and self.trainer.global_rank == 1:
            self.net.a.weight.grad.to_local()[0, 0] = float("nan")  # rank 1's rows only

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)  # with state: a stateless one trips Lightning

    def train_dataloader(self) -> DataLoader:
        """Samples 8k .. 8k + 7 make global batch k; of 2 data-parallel ranks, rank r takes 8k + 4r .. 8k + 4r + 3."""
        ranks = self.trainer.world_size if self.layout == "fsdp" else 1
        keep = [i for i in range(len(self.x)) if (i * ranks // BATCH) % ranks == self.trainer.global_rank % ranks]
        return DataLoader(TensorDataset(self.x[keep], self.y[keep]), batch_size=BATCH // ranks)


class Logged(Callback):
    """What the transform callback logged at each step on this rank, and its state when training starts (after a
    resume restored it), gathered."""

    def __init__(self, transform: Any = None) -> None:
        self.steps: dict[int, dict[str, float]] = {}
        self.transform, self.restored = transform, None

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.transform is not None and self.transform.transform is not None:
            self.restored = self.transform.transform.state_dict(full_state_dict=True)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        metrics = trainer.callback_metrics.items()
        self.steps[trainer.global_step - 1] = {k: float(v) for k, v in metrics if k.startswith(("grok", "ortho"))}


def trainer(root: Path, devices: int, layout: str, callbacks: list[Callback], steps: int, **strategy: Any) -> L.Trainer:
    sizes = {"data_parallel_size": devices, "tensor_parallel_size": 1} if layout == "fsdp" else {
        "data_parallel_size": 1, "tensor_parallel_size": 2}  # fmt: skip
    return L.Trainer(default_root_dir=root, accelerator="cpu", devices=devices, max_steps=steps, callbacks=callbacks,
                     strategy=ModelParallelStrategy(**sizes, **strategy), use_distributed_sampler=False,
                     log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                     logger=L.pytorch.loggers.CSVLogger(root / "logs"), num_sanity_val_steps=0)  # fmt: skip


def run(out: Path, devices: int, layout: str, job: str) -> None:
    name, kind, mode = job.split(":")
    root = out / name
    transform = callback(kind)
    logged = Logged(transform)
    callbacks = [transform, logged]
    if mode.startswith("full-"):
        callbacks.append(ModelCheckpoint(root / "ckpt", save_top_k=-1, every_n_train_steps=4))  # each epoch's end
    full = {"save_distributed_checkpoint": False} if mode == "full-file" else {}
    fit = trainer(root, devices, layout, callbacks, STEPS, **full)
    model = Sharded(layout, NAN_AT if mode == "nan" else None)
    saved = f"epoch={SAVED // 4 - 1}-step={SAVED}.ckpt"
    ckpt = out / mode.removeprefix("resume-") / "ckpt" / saved if mode.startswith("resume-") else None
    fit.fit(model, ckpt_path=ckpt)
    weights = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.net.state_dict().items()}
    made = transform.transform
    result = {"model": weights, "state": transform.state_dict(), "state_bytes": made.state_bytes(),
              "skipped": made.skipped_steps, "logged": logged.steps, "step": fit.global_step, "seen": model.seen,
              "restored": logged.restored}  # fmt: skip
    torch.save(result, root / f"rank{fit.global_rank}.pt")


def plain_loop(model: Sharded, step: Any, transforms: Any, rank: int = 0, ranks: int = 1) -> Any:
    """``STEPS`` steps of a plain loop on the global batches (this rank's part of each): backward, the transforms of
    ``transforms(model)`` in turn, SGD; ``step(loss, optimizer, transforms)`` does the backward and the transforms."""
    optimizer, made = model.configure_optimizers(), transforms(model)
    for k in range(STEPS):
        rows = slice((k % 4) * BATCH + rank * BATCH // ranks, (k % 4) * BATCH + (rank + 1) * BATCH // ranks)
        optimizer.zero_grad()
        step(nn.functional.mse_loss(model.net(model.x[rows]), model.y[rows]), optimizer, made)
        optimizer.step()
    return made


def both(model: Sharded) -> tuple[EMAFilter, OrthoGrad]:
    return EMAFilter(model.net.named_parameters(), 0.8), OrthoGrad(model.net.named_parameters())


def fabric_run(out: Path) -> None:
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import ModelParallelStrategy as FabricModelParallel
    from torch.distributed.fsdp import fully_shard

    def shard(module: nn.Module, mesh: Any) -> nn.Module:
        for m in (module.a, module.b, module):
            fully_shard(m, mesh=mesh["data_parallel"])
        return module

    fabric = Fabric(accelerator="cpu", devices=2, strategy=FabricModelParallel(shard, 2, 1))
    fabric.launch()
    model = Sharded()
    model.net = fabric.setup_module(model.net)

    def step(loss: torch.Tensor, optimizer: Any, made: Any) -> None:
        fabric.backward(loss)
        for transform in made:
            transform.step(optimizer=optimizer)

    made = plain_loop(model, step, both, fabric.global_rank, 2)
    weights = {k: v.full_tensor() for k, v in model.net.state_dict().items()}
    result = {"model": weights, "state": made[0].state_dict(full_state_dict=True)}
    # the state as DTensors: saved by torch.distributed.checkpoint and loaded back in place; and into a new filter
    import torch.distributed.checkpoint as dcp

    dcp.save(made[0].state_dict()["state"], checkpoint_id=out / "dcp")
    for entry in made[0].state.values():
        entry["mu"].zero_()
    dcp.load(made[0].state_dict()["state"], checkpoint_id=out / "dcp")
    fresh = EMAFilter(model.net.named_parameters(), 0.8)
    fresh.load_state_dict(made[0].state_dict())
    result["dcp"], result["loaded"] = (t.state_dict(full_state_dict=True) for t in (made[0], fresh))
    torch.save(result, out / f"fabric{fabric.global_rank}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[3] == "fabric":
        fabric_run(Path(sys.argv[1]))
    for job in sys.argv[4:]:
        run(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], job)

"""What the two grokking examples share: a held-out split, the training and validation steps, the report and the CLI.

``examples/modular_arithmetic.py`` (x * y mod 97, a transformer) and ``examples/digits.py`` (scikit-learn's
digits, an MLP) each define their data and model on top of this module and run through :class:`GrokkingCLI`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_grokfast import GrokfastCallback, OrthoGradCallback  # noqa: F401  (the CLI's short names)


def is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (sharded by FSDP2 or tensor parallelism)."""
    return type(tensor).__name__ == "DTensor" or hasattr(tensor, "device_mesh")


class HeldOutData(LightningDataModule):
    """A data set split by a seeded permutation into a training and a held-out set, served a batch at a time.

    A subclass gives the whole data set (:meth:`load`) and the size of the training set (:meth:`train_size`).

    Args:
        batch_size: Training batch size (the training set is reshuffled every epoch).
        val_batch_size: Validation batch size; ``None`` validates on the whole held-out set at once.
        data_seed: Seed of the random permutation that splits the data (independent of ``seed_everything``,
            so runs with different seeds can share one split).
    """

    def __init__(self, batch_size: int, val_batch_size: Optional[int], data_seed: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if val_batch_size is not None and val_batch_size < 1:
            raise ValueError(f"val_batch_size must be positive or None, got {val_batch_size}")
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.data_seed = data_seed
        self.train_set: Optional[TensorDataset] = None
        self.val_set: Optional[TensorDataset] = None

    def load(self) -> tuple[Tensor, Tensor]:
        """The whole data set: ``(inputs, targets)``."""
        raise NotImplementedError

    def train_size(self, n: int) -> int:
        """How many of the ``n`` examples are for training."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        """Load the data and split it with the seeded permutation.

        Args:
            stage: The Lightning stage (``fit``, ``validate``, ...).
        """
        inputs, targets = self.load()
        generator = torch.Generator().manual_seed(self.data_seed)
        perm = torch.randperm(len(targets), generator=generator)
        n_train = self.train_size(len(targets))
        train_idx, val_idx = perm[:n_train], perm[n_train:]
        self.train_set = TensorDataset(inputs[train_idx], targets[train_idx])
        self.val_set = TensorDataset(inputs[val_idx], targets[val_idx])

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (uses the global torch RNG, seeded by ``seed_everything``)."""
        assert self.train_set is not None
        # the sampler yields a list of indices; the data set returns that batch already collated
        sampler = BatchSampler(RandomSampler(self.train_set), self.batch_size, drop_last=False)
        return DataLoader(self.train_set, sampler=sampler, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """The held-out set, in order, as one batch unless ``val_batch_size`` is set."""
        assert self.val_set is not None
        size = self.val_batch_size or len(self.val_set)
        sampler = BatchSampler(SequentialSampler(self.val_set), size, drop_last=False)
        return DataLoader(self.val_set, sampler=sampler, batch_size=None)


class ClassificationTask(LightningModule):
    """Training and validation steps shared by the examples: a loss, and accuracy over classes.

    Args:
        num_classes: Number of classes of the accuracy metrics.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_loss = MeanMetric()

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: FSDP2 over its data-parallel mesh, each block of a ``ModuleList`` and then
        the whole ``self.model``, so that every rank holds a piece of every parameter (and of the transforms' state).
        Elsewhere, nothing: the model stays as it is."""
        if self.device_mesh is None or any(is_dtensor(p) for p in self.parameters()):
            return  # not sharded, or sharded already (Lightning calls this again for each fit, validate, ...)
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        model: torch.nn.Module = self.model  # type: ignore[assignment]
        for blocks in [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]:
            for block in blocks:
                fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy of the outputs (logits) against the targets."""
        return F.cross_entropy(outputs, targets)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """One training step.

        Args:
            batch: ``(inputs, targets)``.
            batch_idx: Index of the batch in the epoch.

        Returns:
            The loss.
        """
        inputs, targets = batch
        outputs = self(inputs)
        loss = self.loss(outputs, targets)
        self.train_acc(outputs, targets)
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Accumulate validation loss and accuracy.

        Args:
            batch: ``(inputs, targets)``.
            batch_idx: Index of the batch.
        """
        inputs, targets = batch
        outputs = self(inputs)
        self.val_loss.update(self.loss(outputs, targets), weight=len(targets))
        self.val_acc.update(outputs, targets)
        self.log("val_loss", self.val_loss, on_step=False, on_epoch=True)
        self.log("val_acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)


class GrokkingReport(Callback):
    """Record the accuracy curves, report the step that first reached the threshold and plot.

    At the end of ``fit`` it prints ``steps_to_95: N`` (the global step of the first validation
    with ``val_acc >= threshold``, or ``null``), writes ``grokking.json`` and ``accuracy.png`` into
    the trainer's log directory and prints their paths.

    Args:
        threshold: The validation accuracy that counts as generalized.
        monitor: The logged validation accuracy to watch.
        plot: Whether to write the PNG (needs matplotlib).
        title: The task's name in the plot's title.
    """

    def __init__(
        self, threshold: float = 0.95, monitor: str = "val_acc", plot: bool = True, title: str = "x*y mod p"
    ) -> None:
        super().__init__()
        self.threshold = threshold
        self.title = title
        self.monitor = monitor
        self.plot = plot
        self.val_steps: list[int] = []
        self.val_accs: list[float] = []
        self.train_steps: list[int] = []
        self.train_accs: list[float] = []
        self.steps_to_threshold: Optional[int] = None
        self._start = 0.0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start the clock and print the parameter count."""
        self._start = time.perf_counter()
        n_params = sum(p.numel() for p in pl_module.parameters())
        if trainer.is_global_zero:
            print(f"model parameters: {n_params:,}", flush=True)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Record the training accuracy of the batch just stepped."""
        value = trainer.callback_metrics.get("train_acc")
        if value is not None:
            self.train_steps.append(trainer.global_step)
            self.train_accs.append(float(value))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Record the validation accuracy at the current global step."""
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        acc = float(value)
        self.val_steps.append(trainer.global_step)
        self.val_accs.append(acc)
        if self.steps_to_threshold is None and acc >= self.threshold:
            self.steps_to_threshold = trainer.global_step

    def summary(self, trainer: Trainer) -> dict[str, Any]:
        """The run's result as a JSON-serializable dict.

        Args:
            trainer: The trainer that ran.

        Returns:
            ``steps_to_threshold`` (or ``None``), the final and best validation accuracy, the step budget,
            the steps taken, the fit time and the recorded curves.
        """
        return {
            "threshold": self.threshold,
            "steps_to_threshold": self.steps_to_threshold,
            "final_val_acc": self.val_accs[-1] if self.val_accs else None,
            "best_val_acc": max(self.val_accs) if self.val_accs else None,
            "budget": trainer.max_steps if trainer.max_steps >= 0 else None,
            "global_step": trainer.global_step,
            "fit_s": time.perf_counter() - self._start,
            "val_curve": {"step": self.val_steps, "acc": self.val_accs},
            "train_curve": {"step": self.train_steps, "acc": self.train_accs},
        }

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Print the result line and write ``grokking.json`` and ``accuracy.png``."""
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # every rank: a collective with several
        if not trainer.is_global_zero:
            return
        result = self.summary(trainer)
        pct = round(self.threshold * 100)
        if not self.val_accs:
            print(f"steps_to_{pct}: null (no validation ran in {trainer.global_step} steps)", flush=True)
        elif self.steps_to_threshold is None:
            print(
                f"steps_to_{pct}: null (not reached within {trainer.global_step} steps;"
                f" best val_acc {result['best_val_acc']:.4f})",
                flush=True,
            )
        else:
            print(f"steps_to_{pct}: {self.steps_to_threshold}", flush=True)
        log_dir.mkdir(parents=True, exist_ok=True)
        json_path = log_dir / "grokking.json"
        json_path.write_text(json.dumps(result))
        print(f"summary: {json_path}", flush=True)
        if self.plot:
            png = log_dir / "accuracy.png"
            self._plot(png, trainer)
            print(f"plot: {png}", flush=True)

    def _plot(self, path: Path, trainer: Trainer) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        # log x axis: step 0 cannot be shown, plot from step 1
        train = [(s, a) for s, a in zip(self.train_steps, self.train_accs) if s > 0]
        val = [(s, a) for s, a in zip(self.val_steps, self.val_accs) if s > 0]
        if train:
            ax.plot(*zip(*train), label="train", color="tab:blue", linewidth=0.8)
        if val:
            ax.plot(*zip(*val), label="validation", color="tab:red", linewidth=1.2)
        ax.axhline(self.threshold, color="gray", linestyle=":", linewidth=0.8)
        if self.steps_to_threshold:
            ax.axvline(self.steps_to_threshold, color="gray", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("optimization step")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        title = self.title
        if self.steps_to_threshold is not None:
            title += f": val acc >= {self.threshold:g} at step {self.steps_to_threshold}"
        else:
            title += f": val acc < {self.threshold:g} within {trainer.global_step} steps"
        ax.set_title(title, fontsize=10)
        ax.legend(loc="upper left")
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def default_loggers(save_dir: str) -> list[Logger]:
    """A CSVLogger, plus a TensorBoardLogger when tensorboard is installed.

    Args:
        save_dir: Root directory of the logs (the trainer's ``default_root_dir``).

    Returns:
        The loggers; the CSV logger comes first, so the trainer's ``log_dir`` is its directory.
    """
    csv = CSVLogger(save_dir, name="csv")
    loggers: list[Logger] = [csv]
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return loggers
    from lightning.pytorch.loggers import TensorBoardLogger

    loggers.append(TensorBoardLogger(save_dir, name="tensorboard", version=csv.version))
    return loggers


class GrokkingCLI(LightningCLI):
    """LightningCLI with the report callback as ``report`` (defaults: :attr:`report_defaults`) and default loggers."""

    report_defaults: ClassVar[dict[str, Any]] = {}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the report callback, with the task's defaults."""
        parser.add_lightning_class_args(GrokkingReport, "report")
        parser.set_defaults({f"report.{k}": v for k, v in self.report_defaults.items()})

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Use a CSV (and TensorBoard) logger under ``default_root_dir`` unless one is configured."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = config.get("trainer") or {}
        if trainer_config.get("logger") in (None, True):
            root = trainer_config.get("default_root_dir") or os.getcwd()
            kwargs.setdefault("logger", default_loggers(str(root)))
        return super().instantiate_trainer(**kwargs)

"""Grokking on modular arithmetic (x * y mod p) with an optional Grokfast callback.

A LightningCLI application that reproduces the headline task of Grokfast (arXiv 2405.20233):
a 2-layer decoder-only transformer learns ``x * y mod 97`` from half of all equations and, without
help, only generalizes to the other half thousands of steps after it has memorized its training
set. Add ``lightning_grokfast.GrokfastCallback`` to ``trainer.callbacks`` (see
``examples/configs/``) to amplify the slow part of the gradients.

Examples:
    python examples/modular_arithmetic.py fit --config examples/configs/grokfast_ema.yaml
    python examples/modular_arithmetic.py fit --config examples/configs/baseline.yaml \
        --trainer.max_steps 60000
    python examples/modular_arithmetic.py fit --help

At the end of ``fit`` the script prints ``steps_to_95: N`` (the optimizer step at the validation
where the validation accuracy first reached 0.95, or ``null``), writes ``grokking.json`` and
``accuracy.png`` (train and validation accuracy against the step, log x axis) into the run's log
directory and prints their paths.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

import lightning_grokfast  # noqa: F401  (registers the callbacks with LightningCLI by their short names)

# The whole data set lives in memory and is indexed a batch at a time: worker processes would only
# add overhead, so Lightning's hint about ``num_workers`` does not apply here.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def make_equations(p: int) -> tuple[Tensor, Tensor]:
    """All equations ``x * y mod p`` for ``x`` in ``[0, p)`` and ``y`` in ``[1, p)``.

    Tokens ``0 .. p-1`` are the numbers, ``p`` is ``=`` and ``p + 1`` is the operator.

    Args:
        p: The modulus (a prime for a group structure; 97 in the paper).

    Returns:
        ``(inputs, targets)``: inputs of shape ``(N, 4)`` holding ``[x, op, y, =]`` and targets of
        shape ``(N,)`` holding ``x * y mod p``, with ``N = p * (p - 1)``.
    """
    x = torch.arange(p).repeat_interleave(p - 1)
    y = torch.arange(1, p).repeat(p)
    equals = torch.full_like(x, p)
    op = torch.full_like(x, p + 1)
    inputs = torch.stack([x, op, y, equals], dim=1)
    targets = (x * y) % p
    return inputs, targets


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


class ModularArithmeticData(HeldOutData):
    """All equations ``x * y mod p``, split into a training and a held-out half.

    Args:
        p: The modulus; the vocabulary has ``p + 2`` tokens. Linked to ``model.p``.
        train_fraction: The fraction of all equations used for training; the rest is held out.
        batch_size: Training batch size (the training set is reshuffled every epoch).
        val_batch_size: Validation batch size; ``None`` validates on the whole held-out set at once.
        data_seed: Seed of the random permutation that splits the equations (independent of
            ``seed_everything``, so runs with different seeds can share one split).
    """

    def __init__(
        self,
        p: int = 97,
        train_fraction: float = 0.5,
        batch_size: int = 512,
        val_batch_size: Optional[int] = None,
        data_seed: int = 0,
    ) -> None:
        super().__init__(batch_size, val_batch_size, data_seed)
        if p < 2:
            raise ValueError(f"p must be at least 2, got {p}")
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
        self.p = p
        self.train_fraction = train_fraction

    def load(self) -> tuple[Tensor, Tensor]:
        """All equations (see :func:`make_equations`)."""
        return make_equations(self.p)

    def train_size(self, n: int) -> int:
        """``train_fraction`` of the ``n`` equations, rounded."""
        return round(self.train_fraction * n)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention.

    Args:
        width: Model width.
        heads: Number of attention heads (must divide ``width``).
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads != 0:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        # the initialization of torch.nn.MultiheadAttention, which the authors' reference model uses
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Attend over the previous positions.

        Args:
            x: Hidden states of shape ``(batch, seq, width)``.

        Returns:
            The attention output, same shape as ``x``.
        """
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: causal attention and a 4x GELU MLP.

    As in the Grokfast authors' reference model, the first LayerNorm normalizes the residual stream
    itself (``x = ln(x); x = x + attn(x)``), so the attention's residual branches from the normalized
    stream; the MLP is a plain pre-LN residual (``x = x + mlp(ln(x))``). The difference matters with
    weight decay: with the textbook pre-LN block (``x = x + attn(ln(x))``) and weight decay 0.005
    alone (``configs/weight_decay.yaml``, seed 0) the training loss had not left its starting value
    after 2,400 steps, while this block reached 0.95 validation accuracy at step 3,770.

    Args:
        width: Model width.
        heads: Number of attention heads.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        """Apply the block.

        Args:
            x: Hidden states of shape ``(batch, seq, width)``.

        Returns:
            The updated hidden states.
        """
        x = self.ln_attn(x)
        x = x + self.attn(x)
        return x + self.mlp(self.ln_mlp(x))


class Transformer(nn.Module):
    """A decoder-only causal transformer with learned token and position embeddings.

    Args:
        vocab_size: Number of tokens.
        width: Model width.
        layers: Number of blocks.
        heads: Number of attention heads.
        max_len: Longest sequence (number of learned positions).
    """

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, max_len: int = 4) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_len, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """Compute logits for every position.

        Args:
            tokens: Token ids of shape ``(batch, seq)``.

        Returns:
            Logits of shape ``(batch, seq, vocab_size)``.
        """
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_final(x))


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


class ModularArithmeticModel(ClassificationTask):
    """A transformer trained on ``x * y mod p`` with Adam, coupled weight decay and lr warm-up.

    Loss and accuracy are computed on the last position (the token after ``=``) only.

    Args:
        p: The modulus (vocabulary ``p + 2``); set from ``data.p`` when run through the CLI.
        width: Model width.
        layers: Number of transformer blocks.
        heads: Number of attention heads.
        lr: Adam learning rate after warm-up.
        weight_decay: Adam's (coupled, L2) weight decay; the paper uses 0.005 with Grokfast-EMA and
            0.01 with Grokfast-MA, and none for the baseline.
        beta1: Adam's first-moment coefficient.
        beta2: Adam's second-moment coefficient.
        warmup_steps: The learning rate rises linearly over this many optimizer updates.
    """

    def __init__(
        self,
        p: int = 97,
        width: int = 128,
        layers: int = 2,
        heads: int = 4,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        beta1: float = 0.9,
        beta2: float = 0.98,
        warmup_steps: int = 10,
    ) -> None:
        super().__init__(num_classes=p + 2)
        if lr <= 0.0:
            raise ValueError(f"lr must be positive, got {lr}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be non-negative, got {warmup_steps}")
        self.save_hyperparameters()
        self.model = Transformer(p + 2, width, layers, heads, max_len=4)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits of the answer (the last position).

        Args:
            tokens: Token ids ``[x, op, y, =]`` of shape ``(batch, 4)``.

        Returns:
            Logits of shape ``(batch, p + 2)``.
        """
        return self.model(tokens)[:, -1, :]

    def configure_optimizers(self) -> Any:
        """Adam with coupled weight decay and a linear warm-up, stepped every optimizer update."""
        hp = self.hparams
        optimizer = torch.optim.Adam(
            self.parameters(), lr=hp.lr, betas=(hp.beta1, hp.beta2), weight_decay=hp.weight_decay
        )
        warmup = int(hp.warmup_steps)
        # update k (from 0) uses lr * k / warmup until k reaches warmup, as in the authors' reference code
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, step / warmup) if warmup > 0 else 1.0
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


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
        if not trainer.is_global_zero:
            return
        result = self.summary(trainer)
        pct = round(self.threshold * 100)
        if self.steps_to_threshold is None:
            print(
                f"steps_to_{pct}: null (not reached within {trainer.global_step} steps;"
                f" best val_acc {result['best_val_acc']})",
                flush=True,
            )
        else:
            print(f"steps_to_{pct}: {self.steps_to_threshold}", flush=True)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
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


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


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
    """LightningCLI with ``data.p`` linked to ``model.p``, the report callback and default loggers."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link the modulus of the data to the model's vocabulary and add the report callback."""
        parser.link_arguments("data.p", "model.p")
        parser.add_lightning_class_args(GrokkingReport, "report")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Use a CSV (and TensorBoard) logger under ``default_root_dir`` unless one is configured."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = config.get("trainer") or {}
        if trainer_config.get("logger") in (None, True):
            root = trainer_config.get("default_root_dir") or os.getcwd()
            kwargs.setdefault("logger", default_loggers(str(root)))
        return super().instantiate_trainer(**kwargs)


def main(args: ArgsType = None, run: bool = True) -> GrokkingCLI:
    """Run the CLI.

    Args:
        args: Command-line arguments (``None`` reads ``sys.argv``).
        run: Whether to run the subcommand (``False``: only parse and instantiate).

    Returns:
        The CLI object (its ``trainer``, ``model`` and ``datamodule`` are set).
    """
    return GrokkingCLI(
        ModularArithmeticModel,
        ModularArithmeticData,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()

"""Grokking on handwritten digits (the Grokfast paper's MNIST setting) with an optional gradient transform.

A LightningCLI application that reproduces the MNIST grokking task of Grokfast (arXiv 2405.20233,
after Omnigrok, arXiv 2210.01117) on scikit-learn's bundled 8x8 digits (``load_digits``: 1,797
images shipped inside the package, so nothing is downloaded): a 3-layer width-200 ReLU MLP whose
initial parameters are scaled up 8x is trained with AdamW on an MSE loss against the one-hot
target, on 1,000 images. It fits its training set quickly, and with a small weight decay the
accuracy on the 797 held-out images then creeps up over tens of thousands of steps; a large weight
decay, ``lightning_grokfast.GrokfastCallback`` or ``lightning_grokfast.OrthoGradCallback`` (add them
to ``trainer.callbacks``, see ``examples/configs/digits/``) shorten the wait.

Examples:
    python examples/digits.py fit --config examples/configs/digits/grokfast_ema.yaml
    python examples/digits.py fit --config examples/configs/digits/baseline.yaml --trainer.max_steps 40000
    python examples/digits.py fit --config examples/configs/digits/baseline.yaml \
        '--trainer.callbacks+={"class_path": "lightning_grokfast.OrthoGradCallback"}'
    python examples/digits.py fit --help

At the end of ``fit`` the script prints ``steps_to_90: N`` (the optimizer step at the validation
where the validation accuracy first reached 0.9, or ``null``), writes ``grokking.json`` and
``accuracy.png`` into the run's log directory and prints their paths (the report callback, the CLI
and its default loggers are those of ``grokking_task.py``, next to this file).
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from grokking_task import ClassificationTask, GrokkingCLI, HeldOutData
from lightning.pytorch.cli import ArgsType
from torch import Tensor, nn

NUM_CLASSES = 10
NUM_FEATURES = 64
NUM_IMAGES = 1797

# An epoch is only 5 optimizer steps; Lightning warns when that is shorter than ``log_every_n_steps``,
# but it counts the logging interval in global steps across epochs, so the training metrics are logged anyway.
warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")

# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_digit_tensors() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled digits as tensors.

    Returns:
        ``(inputs, targets)``: inputs of shape ``(1797, 64)`` (the 8x8 images flattened, pixel values
        scaled from ``0 .. 16`` to ``[0, 1]``, float32) and the labels ``0 .. 9`` of shape ``(1797,)``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    targets = torch.as_tensor(digits.target, dtype=torch.long)
    return inputs, targets


class DigitsData(HeldOutData):
    """The 1,797 digits, split into a training set and a held-out set by a seeded permutation.

    Args:
        n_train: Number of training images (1,000 in the paper's MNIST setting); the rest is held out.
        batch_size: Training batch size (the training set is reshuffled every epoch).
        val_batch_size: Validation batch size; ``None`` validates on the whole held-out set at once.
        data_seed: Seed of the random permutation that splits the images (independent of
            ``seed_everything``, so runs with different seeds can share one split).
    """

    def __init__(
        self,
        n_train: int = 1000,
        batch_size: int = 200,
        val_batch_size: Optional[int] = None,
        data_seed: int = 0,
    ) -> None:
        super().__init__(batch_size, val_batch_size, data_seed)
        if not 1 <= n_train < NUM_IMAGES:
            raise ValueError(f"n_train must be in [1, {NUM_IMAGES}), got {n_train}")
        self.n_train = n_train

    def load(self) -> tuple[Tensor, Tensor]:
        """The bundled digits (see :func:`load_digit_tensors`)."""
        return load_digit_tensors()

    def train_size(self, n: int) -> int:
        """``n_train``."""
        return self.n_train


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def make_mlp(width: int, depth: int, init_scale: float) -> nn.Sequential:
    """A ReLU MLP ``64 -> width -> ... -> 10`` with PyTorch's default init scaled by ``init_scale``.

    Args:
        width: Width of the hidden layers.
        depth: Number of linear layers (``depth - 1`` hidden layers).
        init_scale: Every parameter (weights and biases) of the default initialization is multiplied
            by this factor.

    Returns:
        The network.
    """
    sizes = [NUM_FEATURES] + [width] * (depth - 1) + [NUM_CLASSES]
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        if i > 0:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(fan_in, fan_out))
    net = nn.Sequential(*layers)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(init_scale)
    return net


class DigitsModel(ClassificationTask):
    """An MLP trained on the digits with AdamW and an MSE loss on the one-hot target.

    Args:
        width: Width of the hidden layers (200 in the paper).
        depth: Number of linear layers (3 in the paper).
        init_scale: Factor applied to every initial parameter (the paper's "x8 init"); a large
            initial norm is what delays generalization on this task.
        lr: AdamW learning rate (constant; no schedule).
        weight_decay: AdamW's decoupled weight decay; 0.01 shows slow grokking, 2.0 generalizes fast.
        beta1: AdamW's first-moment coefficient.
        beta2: AdamW's second-moment coefficient.
    """

    def __init__(
        self,
        width: int = 200,
        depth: int = 3,
        init_scale: float = 8.0,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.999,
    ) -> None:
        super().__init__(num_classes=NUM_CLASSES)
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        if depth < 1:
            raise ValueError(f"depth must be positive, got {depth}")
        if not init_scale > 0.0:
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        if not lr > 0.0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {beta}")
        self.save_hyperparameters()
        self.model = make_mlp(width, depth, init_scale)

    def forward(self, inputs: Tensor) -> Tensor:
        """The 10 outputs (one per class) of a batch of flattened images.

        Args:
            inputs: Images of shape ``(batch, 64)``.

        Returns:
            Outputs of shape ``(batch, 10)``; the prediction is their argmax.
        """
        return self.model(inputs)

    @staticmethod
    def loss(outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean squared error between the outputs and the one-hot targets (mean over all entries).

        Args:
            outputs: Outputs of shape ``(batch, 10)``.
            targets: Labels of shape ``(batch,)``.

        Returns:
            The scalar loss.
        """
        return F.mse_loss(outputs, F.one_hot(targets, NUM_CLASSES).to(outputs.dtype))

    def configure_optimizers(self) -> Any:
        """AdamW (decoupled weight decay) with a constant learning rate."""
        hp = self.hparams
        return torch.optim.AdamW(self.parameters(), lr=hp.lr, betas=(hp.beta1, hp.beta2), weight_decay=hp.weight_decay)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


class DigitsCLI(GrokkingCLI):
    """The shared CLI with the digits' threshold (0.9) and title."""

    report_defaults: ClassVar[dict[str, Any]] = {"threshold": 0.9, "title": "digits"}


def main(args: ArgsType = None, run: bool = True) -> DigitsCLI:
    """Run the CLI; the arguments and the result as in ``modular_arithmetic.main``."""
    return DigitsCLI(DigitsModel, DigitsData, args=args, run=run, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()

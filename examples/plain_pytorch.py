"""Grokfast and ⊥Grad without the Lightning Trainer: a plain PyTorch loop, a mixed-precision loop with a
GradScaler, and a Lightning Fabric loop.

The transforms in ``lightning_grokfast`` do not depend on the Trainer. Call ``step()`` between the
backward pass and ``optimizer.step()``:

    loss.backward()          # or fabric.backward(loss)
    grokfast.step()          # g <- g + lamb * EMA(g), in place on every .grad
    optimizer.step()

With Fabric, call it after ``fabric.backward`` (which, under DDP, has already averaged the gradients
across processes) and before ``optimizer.step()``. With a GradScaler the transform must see unscaled
gradients: pass the scaler and the optimizer, ``grokfast.step(scaler=scaler, optimizer=optimizer)``, which
unscales through the scaler unless ``scaler.unscale_(optimizer)`` already ran, then ``scaler.step``.

Run:
    python examples/plain_pytorch.py
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from torch import Tensor, nn

from lightning_grokfast import EMAFilter, OrthoGrad


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def make_data(n: int = 512, dim: int = 16, classes: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A generated classification task: labels from a random linear teacher.

    Args:
        n: Number of samples.
        dim: Input dimension.
        classes: Number of classes.
        seed: Seed of the generator.

    Returns:
        ``(inputs, labels)``.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator)
    teacher = torch.randn(dim, classes, generator=generator)
    return x, (x @ teacher).argmax(dim=1)


def make_model(dim: int = 16, classes: int = 4) -> nn.Module:
    """A small MLP.

    Args:
        dim: Input dimension.
        classes: Number of classes.

    Returns:
        The model.
    """
    return nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, classes))


def train_plain(steps: int = 300, use_filter: bool = True, seed: int = 0, orthograd: bool = False) -> float:
    """Train with a plain PyTorch loop, Grokfast-EMA (and optionally ⊥Grad) between backward and the step.

    Args:
        steps: Optimizer steps (full batch).
        use_filter: Whether to apply the EMA filter.
        seed: Seed of the model initialization.
        orthograd: Whether to apply ⊥Grad after the filter.

    Returns:
        The final training loss.
    """
    torch.manual_seed(seed)
    x, y = make_data()
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    grokfast = EMAFilter(model.named_parameters(), alpha=0.98, lamb=2.0) if use_filter else None
    ortho = OrthoGrad(model.named_parameters()) if orthograd else None
    loss = torch.tensor(float("nan"))
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if grokfast is not None:
            last = step == steps
            stats = grokfast.step(compute_stats=last)  # statistics cost extra reads: ask only when needed
            if last:
                print(
                    f"  last step: amplification {_fmt(stats.amplification)}x (filtered / raw gradient norm),"
                    f" slow/raw norm {_fmt(stats.slow_ratio)}, cosine(raw, slow) {_fmt(stats.cosine)}"
                )
        if ortho is not None:
            ortho.step()  # after the filter: the filter's state is built from the raw gradients
        optimizer.step()
    accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    print(f"  final loss {loss.item():.4f}, train accuracy {accuracy:.3f}")
    if grokfast is not None:
        print(f"  filter state: {grokfast.state_bytes() / 1024:.1f} KiB, skipped steps {grokfast.skipped_steps}")
    return float(loss.item())


def train_amp(steps: int = 300, seed: int = 0, unscale_first: bool = False) -> tuple[float, EMAFilter]:
    """Train in float16 autocast with a ``torch.amp.GradScaler``: the filter must see unscaled gradients.

    Args:
        steps: Optimizer steps (full batch).
        seed: Seed of the model initialization.
        unscale_first: Call ``scaler.unscale_(optimizer)`` explicitly before the filter (the same result as
            letting ``step(scaler=..., optimizer=...)`` do it).

    Returns:
        The final training loss and the filter.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    x, y = (t.to(device) for t in make_data())
    model = make_model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**12)
    grokfast = EMAFilter(model.named_parameters(), alpha=0.98, lamb=2.0)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.autocast(device, dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if unscale_first:
            scaler.unscale_(optimizer)
        grokfast.step(scaler=scaler, optimizer=optimizer)  # unscales through the scaler if not yet, then filters
        scaler.step(optimizer)  # skips the update if the unscaled gradients held inf or NaN
        scaler.update()
    print(f"  final loss {loss.item():.4f}, loss scale {scaler.get_scale():g}")
    return float(loss.item()), grokfast


def train_fabric(steps: int = 300, seed: int = 0) -> float:
    """Train with Lightning Fabric: ``fabric.backward``, then the filter, then the optimizer.

    Args:
        steps: Optimizer steps (full batch).
        seed: Seed of the model initialization.

    Returns:
        The final training loss.
    """
    fabric = Fabric(accelerator="cpu", devices=1)
    fabric.seed_everything(seed)
    x, y = make_data()
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model, optimizer = fabric.setup(model, optimizer)
    grokfast = EMAFilter(model.parameters(), alpha=0.98, lamb=2.0)
    x, y = fabric.to_device((x, y))
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        fabric.backward(loss)  # under DDP the gradients are averaged here, before the filter sees them
        grokfast.step()
        optimizer.step()
    fabric.print(f"  final loss {loss.item():.4f}")
    return float(loss.item())


def main() -> None:
    """Run the variants and print their final losses."""
    print("plain PyTorch, no filter:")
    train_plain(use_filter=False)
    print("plain PyTorch, Grokfast-EMA (alpha 0.98, lamb 2):")
    train_plain(use_filter=True)
    print("plain PyTorch, Grokfast-EMA then ⊥Grad:")
    train_plain(use_filter=True, orthograd=True)
    print("float16 autocast with a GradScaler, Grokfast-EMA:")
    train_amp()
    print("Lightning Fabric, Grokfast-EMA (alpha 0.98, lamb 2):")
    train_fabric()


if __name__ == "__main__":
    main()

"""Generic test helpers: a naive Grokfast reference, a tiny model and gradient recorders.

Everything here is deliberately simple and independent of ``lightning_grokfast``:

* :class:`NaiveEMA` and :class:`NaiveMA` restate the two filters of arXiv 2405.20233 as a plain
  per-parameter Python loop in float64 (no ``foreach``, no in-place tricks), so that the package
  can be checked against them.
* :class:`TinyModule` is a small LightningModule on generated data with parameters of several
  shapes, a parameter that only gets a gradient from a given batch index on, and a frozen one.
* :class:`GradRecorder` clones every parameter's ``.grad`` in ``on_before_optimizer_step``;
  placed before / after the Grokfast callback it sees the raw / the filtered gradients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

GradDict = dict[str, Tensor | None]
"""One optimizer step's gradients: parameter name -> gradient (``None`` when it has none)."""


class NaiveEMA:
    """Naive reference of the Grokfast EMA filter (the paper's Algorithm 2), in float64.

    Per parameter: the first time it has a gradient ``mu = g``; then at every step that it has a
    gradient ``mu = alpha * mu + (1 - alpha) * g`` and ``g_hat = g + lamb * mu``. Parameters
    without a gradient at a step are skipped and keep their state.

    Args:
        alpha: EMA momentum.
        lamb: Amplification of the slow component.
        feedback: Build a deliberately *wrong* variant whose state is taken from the filtered
            gradient (``mu = alpha * mu_prev + (1 - alpha) * g_hat``) instead of the raw one.
            Used only to show that the tests can tell the two apart.
    """

    def __init__(self, alpha: float, lamb: float, feedback: bool = False) -> None:
        self.alpha = alpha
        self.lamb = lamb
        self.feedback = feedback
        self.mu: dict[str, Tensor] = {}

    def step(self, grads: Mapping[str, Tensor | None]) -> GradDict:
        """Filter one step's gradients; returns the filtered gradients in float64."""
        out: GradDict = {}
        for name, grad in grads.items():
            if grad is None:
                out[name] = None
                continue
            g = grad.detach().to(torch.float64).clone()
            first = name not in self.mu
            prev = g.clone() if first else self.mu[name]
            mu = self.alpha * prev + (1.0 - self.alpha) * g
            g_hat = g + self.lamb * mu
            if self.feedback:
                mu = g_hat.clone() if first else self.alpha * prev + (1.0 - self.alpha) * g_hat
            self.mu[name] = mu
            out[name] = g_hat
        return out


class NaiveMA:
    """Naive reference of the Grokfast MA filter (the paper's Algorithm 1), in float64.

    Per parameter a list of the last ``window_size`` raw gradients, the current one included.
    With ``warmup`` the gradient is left untouched until the list is full; afterwards (or from
    the first step without warm-up) ``g_hat = g + lamb * mean(list)`` (the mean divides by the
    current length) or ``g + lamb * sum(list)`` for ``reduction="sum"``. Parameters without a
    gradient at a step are skipped and keep their history.

    Args:
        window_size: Number of gradients kept per parameter.
        lamb: Amplification of the slow component.
        warmup: Leave gradients untouched until the window is full.
        reduction: ``"mean"`` or ``"sum"`` of the window.
        feedback: Build a deliberately *wrong* variant whose history stores the filtered
            gradient of each step instead of the raw one.
    """

    def __init__(
        self,
        window_size: int,
        lamb: float,
        warmup: bool = True,
        reduction: str = "mean",
        feedback: bool = False,
    ) -> None:
        self.window_size = window_size
        self.lamb = lamb
        self.warmup = warmup
        self.reduction = reduction
        self.feedback = feedback
        self.history: dict[str, list[Tensor]] = {}

    def step(self, grads: Mapping[str, Tensor | None]) -> GradDict:
        """Filter one step's gradients; returns the filtered gradients in float64."""
        out: GradDict = {}
        for name, grad in grads.items():
            if grad is None:
                out[name] = None
                continue
            g = grad.detach().to(torch.float64).clone()
            window = self.history.setdefault(name, [])
            window.append(g.clone())
            if len(window) > self.window_size:
                window.pop(0)
            if self.warmup and len(window) < self.window_size:
                out[name] = g
                continue
            total = torch.zeros_like(g)
            for old in window:
                total = total + old
            slow = total / len(window) if self.reduction == "mean" else total
            g_hat = g + self.lamb * slow
            if self.feedback:
                window[-1] = g_hat.clone()
            out[name] = g_hat
        return out


def rel_err(actual: Tensor, expected: Tensor, scale: Tensor | None = None) -> float:
    """Return ``max|actual - expected| / max(scale)`` in float64 (``scale`` defaults to ``|expected|``).

    Passing the operand magnitudes from :func:`magnitude_reference` as ``scale`` measures the error
    against the size of what was summed, the natural yardstick of float rounding: ``g + lamb * slow``
    can cancel to a result much smaller than its terms, and a plain relative error then measures
    the cancellation, not the implementation.
    """
    a = actual.detach().to(torch.float64)
    b = expected.detach().to(torch.float64)
    if not b.numel():
        return 0.0
    s = b.abs() if scale is None else scale.detach().to(torch.float64).abs()
    return (a - b).abs().max().item() / max(s.max().item(), 1e-30)


def assert_grads_match(
    actual: list[GradDict],
    expected: list[GradDict],
    rtol: float = 1e-6,
    what: str = "",
    scale: list[GradDict] | None = None,
) -> None:
    """Assert two per-step gradient sequences agree: same ``None`` pattern, :func:`rel_err` < rtol.

    Args:
        actual: Gradients produced by the code under test, one dict per optimizer step.
        expected: Reference gradients, same layout.
        rtol: Largest allowed :func:`rel_err` per tensor.
        what: Label for the failure message.
        scale: Optional per-step operand magnitudes (see :func:`magnitude_reference`).
    """
    assert len(actual) == len(expected), f"{what}: {len(actual)} steps vs {len(expected)}"
    for step, (act, exp) in enumerate(zip(actual, expected, strict=True)):
        assert act.keys() == exp.keys(), f"{what} step {step}: names differ"
        for name in exp:
            a, b = act[name], exp[name]
            if b is None:
                assert a is None, f"{what} step {step} {name}: expected no gradient, got one"
                continue
            assert a is not None, f"{what} step {step} {name}: gradient missing"
            assert a.shape == b.shape, f"{what} step {step} {name}: shape {a.shape} vs {b.shape}"
            s = None if scale is None else scale[step][name]
            err = rel_err(a, b, s)
            assert err < rtol, f"{what} step {step} {name}: relative error {err:.3e} >= {rtol:.0e}"


def max_rel_err(actual: list[GradDict], expected: list[GradDict]) -> float:
    """Largest :func:`rel_err` over all steps and tensors that both sequences hold."""
    worst = 0.0
    for act, exp in zip(actual, expected, strict=True):
        for name, b in exp.items():
            a = act.get(name)
            if a is not None and b is not None:
                worst = max(worst, rel_err(a, b))
    return worst


def snapshot_grads(named_params: Iterable[tuple[str, nn.Parameter]]) -> GradDict:
    """Clone every parameter's ``.grad`` (``None`` stays ``None``)."""
    return {name: (p.grad.detach().clone() if p.grad is not None else None) for name, p in named_params}


def run_reference(ref: NaiveEMA | NaiveMA, raw: list[GradDict]) -> list[GradDict]:
    """Feed a recorded raw-gradient sequence through a naive reference."""
    return [ref.step(step) for step in raw]


def magnitude_reference(ref: NaiveEMA | NaiveMA, raw: list[GradDict]) -> list[GradDict]:
    """Operand magnitudes of the filter: a fresh reference run on ``|g|``.

    Elementwise this is ``|g| + lamb * slow(|g|)``, which bounds the size of every term the filter
    adds up, so float rounding errors are a small multiple of ``eps`` times it.
    """
    return run_reference(ref, [{n: (g.abs() if g is not None else None) for n, g in s.items()} for s in raw])


def _is_package_object(obj: Any) -> bool:
    return type(obj).__module__.startswith("lightning_grokfast")


def collect_tensors(obj: Any, _seen: set[int] | None = None) -> list[Tensor]:
    """Every tensor reachable from ``obj`` (excluding ``nn.Parameter``s).

    Walks dicts, lists, tuples, sets and deques, and the attributes of objects whose class is
    defined in ``lightning_grokfast`` (so a filter's or the callback's private state is found
    without knowing its layout); it does not descend into modules, optimizers or trainers.
    """
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, nn.Parameter):
        return []
    if isinstance(obj, Tensor):
        return [obj]
    found: list[Tensor] = []
    if isinstance(obj, Mapping):
        for value in obj.values():
            found += collect_tensors(value, seen)
    elif isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
        for value in obj:
            found += collect_tensors(value, seen)
    elif _is_package_object(obj):
        attrs = dict(getattr(obj, "__dict__", {}))
        for slot in getattr(type(obj), "__slots__", ()):
            if hasattr(obj, slot):
                attrs[slot] = getattr(obj, slot)
        for value in attrs.values():
            found += collect_tensors(value, seen)
    return found


def storage_ptr(t: Tensor) -> int:
    """Address of a tensor's underlying storage (0 for empty storages)."""
    return t.untyped_storage().data_ptr()


def assert_state_not_aliasing_grads(owner: Any, params: Iterable[nn.Parameter]) -> None:
    """Assert no tensor held by ``owner`` shares storage with any parameter's ``.grad``."""
    grad_ptrs = {storage_ptr(p.grad) for p in params if p.grad is not None}
    grad_ptrs.discard(0)
    state = collect_tensors(owner)
    assert state, "found no state tensors to check"
    shared = [tuple(t.shape) for t in state if storage_ptr(t) in grad_ptrs]
    assert not shared, f"filter state shares storage with .grad (shapes {shared})"


def tensors_equal(a: Any, b: Any) -> bool:
    """Exact, recursive equality of nested dicts / lists / tensors / numbers."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# --------------------------------------------------------------------------- Lightning side


def make_loader(num_samples: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """A deterministic, unshuffled regression loader: 4 inputs, 1 target."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, 4, generator=gen)
    y = torch.sin(x @ torch.tensor([[1.0], [-2.0], [0.5], [1.5]])) + 0.1 * x[:, :1] ** 2
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class TinyModule(L.LightningModule):
    """A tiny MLP with parameters of several shapes, a late-starting and a frozen parameter.

    Parameters: ``fc1`` (6x4 weight, 6 bias), ``fc2`` (1x6 weight, 1 bias), ``scale`` (0-d),
    ``late`` (6,) used only when ``batch_idx >= late_from`` (so it first gets a gradient at
    that batch and, with ``set_to_none=True``, has none on the earlier batches of later
    epochs), and ``frozen`` (6,) with ``requires_grad=False``. The gradients right after
    ``backward()`` are recorded in :attr:`produced`.

    Args:
        late_from: First batch index that uses ``late``; ``None`` uses it on every batch.
        set_to_none: Argument passed to ``optimizer.zero_grad``.
        lr: Adam learning rate.
        seed: Seed of the initial weights.
    """

    def __init__(self, late_from: int | None = 3, set_to_none: bool = True, lr: float = 1e-2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 1)
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.late = nn.Parameter(0.1 * torch.randn(6))
        self.frozen = nn.Parameter(0.1 * torch.randn(6), requires_grad=False)
        self.late_from = late_from
        self.set_to_none = set_to_none
        self.lr = lr
        self.produced: list[GradDict] = []
        self.zeroed_to_none: list[bool] = []  # after each zero_grad: were all grads None?

    def forward(self, x: Tensor, use_late: bool = True) -> Tensor:
        h = torch.tanh(self.fc1(x) + self.frozen)
        if use_late:
            h = h * (1.0 + self.late)
        return self.scale * self.fc2(h)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        use_late = self.late_from is None or batch_idx >= self.late_from
        return nn.functional.mse_loss(self(x, use_late), y)

    def on_after_backward(self) -> None:
        self.produced.append(snapshot_grads(self.named_parameters()))

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=self.set_to_none)
        self.zeroed_to_none.append(all(p.grad is None for p in self.parameters()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)


class GradRecorder(L.Callback):
    """Clones every parameter's gradient in ``on_before_optimizer_step``.

    Callbacks run in list order, so a recorder placed before the Grokfast callback sees the raw
    gradients and one placed after it sees the filtered ones.

    Args:
        check_alias_of: Optional object (e.g. the Grokfast callback) whose state tensors must not
            share storage with any ``.grad``; checked at every step.
    """

    def __init__(self, check_alias_of: Any = None) -> None:
        self.steps: list[GradDict] = []
        self.check_alias_of = check_alias_of

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.steps.append(snapshot_grads(pl_module.named_parameters()))
        if self.check_alias_of is not None:
            assert_state_not_aliasing_grads(self.check_alias_of, pl_module.parameters())


@dataclass
class TrainRun:
    """What :func:`train_with` recorded."""

    module: TinyModule
    trainer: L.Trainer
    raw: list[GradDict] = field(default_factory=list)
    filtered: list[GradDict] = field(default_factory=list)


def train_with(
    grokfast: L.Callback,
    max_steps: int = 30,
    late_from: int | None = 3,
    set_to_none: bool = True,
    check_alias: bool = True,
    seed: int = 0,
    logger: Logger | bool = False,
) -> TrainRun:
    """Fit :class:`TinyModule` on CPU with ``[raw recorder, grokfast, filtered recorder]``.

    Args:
        grokfast: The callback under test.
        max_steps: Number of optimizer steps (8 batches an epoch).
        late_from: See :class:`TinyModule`.
        set_to_none: See :class:`TinyModule`.
        check_alias: Check at every step that ``grokfast``'s tensors share no storage with grads.
        seed: Seed of the weights.
        logger: Trainer logger (``False``: none; the callback then computes no diagnostics).
    """
    L.seed_everything(seed, verbose=False)
    module = TinyModule(late_from=late_from, set_to_none=set_to_none, seed=seed)
    before = GradRecorder()
    after = GradRecorder(check_alias_of=grokfast if check_alias else None)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=[before, grokfast, after],
    )
    trainer.fit(module, train_dataloaders=make_loader())
    return TrainRun(module=module, raw=before.steps, filtered=after.steps, trainer=trainer)

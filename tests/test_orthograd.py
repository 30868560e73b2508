"""⊥Grad (Prieto et al. 2025, arXiv 2501.04697): ``OrthoGrad`` in plain PyTorch and ``OrthoGradCallback``.

Everything is checked against a naive float64 reference written from the definition, per tensor ``w``, ``g``::

    g_perp = g - (<w, g> / <w, w>) w;   g <- g_perp * |g| / |g_perp|

* plain transform: parity on several shapes over a real training loop (foreach or not, named or not), the result
  orthogonal to ``w`` with ``|g|`` kept; the edge rules (zero weight, scalar, radial gradient); agreement with
  ``pytorch_optimizer.OrthoGrad``; ``apply_to``; 16-bit gradients rounded once; non-finite steps skipped;
  frozen parameters; the ``radial_fraction`` statistic.
* callback under a real Trainer: the optimizer steps on the transformed gradient (SGD, lr 1), once per optimizer
  step under accumulation, before value clipping; manual optimization with two optimizers; DDP; logging on
  logging steps only; composition with ``GrokfastCallback`` (EMA on the raw gradient, then ⊥Grad, whatever the
  order listed); two OrthoGradCallbacks refused.
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import lightning as L
import pytest
import torch
from helpers import Grads, Run, TinyModel, fit, make_trainer, regression_data
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_grokfast import EMAFilter, GrokfastCallback, OrthoGrad, OrthoGradCallback, OrthoGradStats

# ---------------------------------------------------------------------------------------------- reference


def naive_orthograd(w: Tensor, g: Tensor) -> Tensor:
    """⊥Grad of one tensor from the definition, in float64, with the edge rules: a zero weight leaves ``g`` as it
    is; a gradient radial to float32 rounding (so any gradient of a one-element tensor) becomes 0."""
    w64, g64 = w.detach().double().reshape(-1), g.detach().double().reshape(-1)
    if not bool(w64.any()):
        return g64.reshape(g.shape).clone()
    perp = g64 - (w64 @ g64) / (w64 @ w64) * w64
    if perp.norm() <= 1e-6 * g64.norm():
        return torch.zeros(g.shape, dtype=torch.float64)
    return (perp * g64.norm() / perp.norm()).reshape(g.shape)


def naive_step(weights: Mapping[str, Tensor], grads: Mapping[str, Optional[Tensor]]) -> dict[str, Optional[Tensor]]:
    return {n: None if g is None else naive_orthograd(weights[n], g) for n, g in grads.items()}


def rel(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|`` in float64."""
    a, b = actual.detach().double(), expected.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def ulps(actual: Tensor, expected: Tensor) -> Tensor:
    """Elementwise distance in units in the last place of ``actual``'s dtype (both of that dtype)."""
    assert actual.dtype == expected.dtype
    spacing = torch.finfo(actual.dtype).eps * torch.maximum(actual.double().abs(), expected.double().abs())
    spacing = spacing.clamp_min(torch.finfo(actual.dtype).tiny)
    return (actual.double() - expected.double()).abs() / spacing


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


SHAPES = {"matrix": (6, 5), "vector": (7,), "cube": (2, 3, 4), "conv": (4, 3, 3, 3)}


class Shapes(nn.Module):
    """A model whose parameters have the shapes of :data:`SHAPES`, each reached by the loss."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        for name, shape in SHAPES.items():
            self.register_parameter(name, nn.Parameter((0.5 * torch.randn(shape, generator=gen)).to(dtype)))

    def forward(self, x: Tensor) -> Tensor:  # x: (batch, 5)
        h = torch.tanh(x @ self.matrix.T)  # (batch, 6)
        h = torch.tanh(h[:, :3, None] * self.cube.sum(0))  # (batch, 3, 4)
        h = (h * torch.tanh(self.conv.mean((1, 2, 3)))).sum(-1)  # (batch, 3)
        return (h * self.vector[:3]).sum(-1, keepdim=True) + self.vector[3:].sum()


def _batch(seed: int, n: int = 16, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen).to(dtype), torch.randn(n, 1, generator=gen).to(dtype)


# ---------------------------------------------------------------------------------------------- plain transform


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("named", [True, False], ids=["named", "unnamed"])
def test_parity_with_the_definition_over_a_training_loop(foreach: bool, named: bool) -> None:
    """Every step of a real loop: each tensor's new gradient is the definition's, orthogonal to ``w``, of norm |g|,
    and the optimizer steps on it."""
    model = Shapes()
    orthograd = OrthoGrad(model.named_parameters() if named else model.parameters(), foreach=foreach)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    for step in range(6):
        x, y = _batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        stats = orthograd.step()
        assert isinstance(stats, OrthoGradStats) and stats.applied and stats.num_tensors == len(SHAPES)
        for name, p in model.named_parameters():
            g, w, g0 = p.grad, weights[name], raw[name]
            assert g.shape == g0.shape and g.dtype == g0.dtype
            assert not torch.equal(g, g0), f"step {step} {name}: gradient untouched"
            assert rel(g, naive_orthograd(w, g0)) < 1e-5, f"step {step} {name}"
            cos = float((w.double() * g.double()).sum() / (w.double().norm() * g.double().norm()))
            assert abs(cos) < 1e-6, f"step {step} {name}: not orthogonal (cos {cos:.2e})"
            assert float(g.double().norm()) == pytest.approx(float(g0.double().norm()), rel=1e-6)
        opt.step()


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=_dtype_id)
def test_zero_weight_leaves_the_gradient_bit_identical(foreach: bool, dtype: torch.dtype) -> None:
    w = nn.Parameter(torch.zeros(5, 7, dtype=dtype))
    other = nn.Parameter(torch.randn(3, 4).to(dtype))  # a normal tensor in the same group
    g = torch.randn(5, 7).to(dtype)
    w.grad, other.grad = g.clone(), torch.randn(3, 4).to(dtype)
    other_ref = naive_orthograd(other, other.grad)
    OrthoGrad([w, other], foreach=foreach).step()
    assert torch.equal(w.grad, g)
    assert rel(other.grad, other_ref) < (1e-5 if dtype in (torch.float32, torch.float64) else 1e-2)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=_dtype_id)
def test_scalar_parameter_gradient_becomes_zero(foreach: bool, dtype: torch.dtype) -> None:
    """A 0-d (and a 1-element) parameter has no direction orthogonal to itself: its gradient becomes exactly 0."""
    s = nn.Parameter(torch.tensor(0.7, dtype=dtype))
    one = nn.Parameter(torch.tensor([-1.3], dtype=dtype))
    s.grad, one.grad = torch.tensor(0.3, dtype=dtype), torch.tensor([2.9], dtype=dtype)
    OrthoGrad([s, one], foreach=foreach).step()
    assert s.grad.dtype == dtype and torch.equal(s.grad, torch.zeros((), dtype=dtype))
    assert torch.equal(one.grad, torch.zeros(1, dtype=dtype))


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=_dtype_id)
@pytest.mark.parametrize("c", [0.3, -2.7, 1e-3, 123.0])
def test_radial_gradient_becomes_exactly_zero(foreach: bool, dtype: torch.dtype, c: float) -> None:
    """``g = c * w`` (rounded): no orthogonal direction; the rounding residue must not be rescaled to ``|g|``. Also
    for a tensor of a million values (a 1000 x 1000 layer), where float32 sums carry the most rounding."""
    gen = torch.Generator().manual_seed(1)
    shapes = [*SHAPES.values(), (1000, 1000)]
    params = [nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype)) for shape in shapes]
    for p in params:
        p.grad = c * p.detach()
    OrthoGrad(params, foreach=foreach).step()
    for p in params:
        assert torch.equal(p.grad, torch.zeros_like(p)), f"shape {tuple(p.shape)}: max {p.grad.abs().max()}"


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_dtype_id)
def test_radial_gradient_of_a_16bit_parameter_becomes_zero(foreach: bool, dtype: torch.dtype) -> None:
    """A 16-bit gradient radial up to its own (16-bit) rounding: ``g = round16(c * w)``. Rescaling the residue
    (relative size ~1e-3) to ``|g|`` steps in a random direction; the edge rule says it must become 0.

    Exactly radial ones (``c`` a power of two) are zeroed too, and an orthogonal part of a few percent is not."""
    gen = torch.Generator().manual_seed(2)
    w = nn.Parameter(torch.randn(64, 32, generator=gen).to(dtype))
    exact = nn.Parameter(torch.randn(64, 32, generator=gen).to(dtype))
    w.grad = (0.3 * w.detach().double()).to(dtype)
    exact.grad = 0.5 * exact.detach()
    OrthoGrad([exact], foreach=foreach).step()
    assert torch.equal(exact.grad, torch.zeros_like(exact))
    g0 = w.grad.clone()
    OrthoGrad([w], foreach=foreach).step()
    residue = (g0.double() - (w.double() * g0.double()).sum() / w.double().square().sum() * w.double()).norm()
    assert residue / g0.double().norm() < 4 * torch.finfo(dtype).eps  # radial up to 16-bit rounding
    assert torch.equal(w.grad, torch.zeros_like(w)), (
        f"{dtype}: rounding residue amplified to |g| (max |g| after: {w.grad.abs().max().item():.3g})"
    )
    # a real orthogonal part of 5% is kept and rescaled to |g|, whatever the tolerance chosen for rounding
    other = torch.randn(64, 32, generator=gen).double()
    other -= (other * w.double()).sum() / w.double().square().sum() * w.double()
    g = (w.double() + 0.05 * other * w.double().norm() / other.norm()).to(dtype)
    w.grad = g.clone()
    OrthoGrad([w], foreach=foreach).step()
    assert w.grad.any() and rel(w.grad, naive_orthograd(w, g)) < 0.05


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
def test_agrees_with_pytorch_optimizer(foreach: bool) -> None:
    """On non-degenerate gradients the update equals ``pytorch_optimizer.OrthoGrad(SGD)``'s."""
    po = pytest.importorskip("pytorch_optimizer")
    ours, theirs = Shapes(), Shapes()
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    opt_theirs = po.OrthoGrad(torch.optim.SGD(theirs.parameters(), lr=0.1))
    orthograd = OrthoGrad(ours.named_parameters(), foreach=foreach)
    for step in range(4):
        x, y = _batch(step)
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
        orthograd.step()
        opt_ours.step()
        opt_theirs.step()
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, s=step, n=name: f"{s} {n}: {m}")
    assert not torch.equal(ours.matrix, Shapes().matrix)  # it trained


def test_apply_to_matrices_transforms_only_tensors_of_two_or_more_dims() -> None:
    gen = torch.Generator().manual_seed(3)
    params = {
        "matrix": nn.Parameter(torch.randn(4, 3, generator=gen)),
        "conv": nn.Parameter(torch.randn(2, 3, 2, 2, generator=gen)),
        "bias": nn.Parameter(torch.randn(4, generator=gen)),
        "gain": nn.Parameter(torch.randn((), generator=gen)),
    }
    raw = {}
    for name, p in params.items():
        p.grad = torch.randn(p.shape, generator=gen)
        raw[name] = p.grad.clone()
    stats = OrthoGrad(params.items(), apply_to="matrices").step(compute_stats=True)
    assert stats.num_tensors == 2
    for name in ("bias", "gain"):
        assert torch.equal(params[name].grad, raw[name]), name
    for name in ("matrix", "conv"):
        assert rel(params[name].grad, naive_orthograd(params[name], raw[name])) < 1e-5, name
    # "all" (the default) does transform the vector and zeroes the scalar
    for name, p in params.items():
        p.grad = raw[name].clone()
    OrthoGrad(params.items()).step()
    assert rel(params["bias"].grad, naive_orthograd(params["bias"], raw["bias"])) < 1e-5
    assert torch.equal(params["gain"].grad, torch.zeros(()))


@pytest.mark.parametrize("bad", ["matrix", "All", "vectors", None])
def test_bad_apply_to_is_refused_naming_it(bad: Any) -> None:
    p = nn.Parameter(torch.randn(3, 3))
    for make in (lambda: OrthoGrad([p], apply_to=bad), lambda: OrthoGradCallback(apply_to=bad)):
        with pytest.raises(ValueError, match="apply_to") as err:
            make()
        assert repr(bad) in str(err.value)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_dtype_id)
def test_16bit_gradients_are_the_exact_result_rounded_once(foreach: bool, dtype: torch.dtype) -> None:
    """16-bit params and grads: the float64 result on the same 16-bit inputs, cast once to the dtype. Computing in
    16 bits (several roundings) would be off by many ulps; the gradients keep their dtype."""
    model = Shapes(dtype)
    orthograd = OrthoGrad(model.named_parameters(), foreach=foreach)
    total, exact = 0, 0
    for step in range(3):
        x, y = _batch(step, dtype=dtype)
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        expected = {n: naive_orthograd(p, p.grad).to(dtype) for n, p in model.named_parameters()}
        orthograd.step()
        for name, p in model.named_parameters():
            assert p.grad.dtype == dtype
            off = ulps(p.grad, expected[name])
            assert float(off.max()) <= 1.0, f"step {step} {name}: {float(off.max()):.1f} ulps off"
            total += off.numel()
            exact += int((off == 0).sum())
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad
    assert exact >= 0.98 * total, f"only {exact}/{total} values equal the once-rounded result"


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_nonfinite_gradient_skips_the_step(foreach: bool, bad: float) -> None:
    model = Shapes()
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    model.cube.grad[1, 2, 3] = bad
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    orthograd = OrthoGrad(model.named_parameters(), foreach=foreach)
    with pytest.warns(RuntimeWarning, match="cube") as record:
        stats = orthograd.step(compute_stats=True)
        stats2 = orthograd.step()
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert stats.skipped_nonfinite and not stats.applied and stats.radial_fraction is None
    assert stats2.skipped_nonfinite and not stats2.applied
    assert orthograd.skipped_steps == 2
    for name, p in model.named_parameters():  # bit for bit, the non-finite one and the others
        assert torch.equal(p.grad.view(-1).view(torch.int32), before[name].view(-1).view(torch.int32)), name
    # the next finite step is transformed again, without a further warning
    model.cube.grad[1, 2, 3] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert orthograd.step().applied
    assert orthograd.skipped_steps == 2


def test_parameters_without_gradient_are_skipped() -> None:
    model = Shapes()
    model.vector.requires_grad_(False)
    orthograd = OrthoGrad(model.named_parameters())
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    assert model.vector.grad is None
    stats = orthograd.step()
    assert stats.num_tensors == len(SHAPES) - 1 and model.vector.grad is None
    nothing = OrthoGrad([nn.Parameter(torch.ones(3))]).step(compute_stats=True)
    assert not nothing.applied and nothing.num_tensors == 0 and nothing.radial_fraction is None


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
def test_radial_fraction_by_hand(foreach: bool) -> None:
    """w1 = (1, 0), g1 = (3, 4): radial part 3 of |g1| = 5. w2 = (0, 2, 0), g2 = (0, 0, 12): radial part 0.
    Over both: sqrt(3^2 + 0) / sqrt(5^2 + 12^2) = 3 / 13. Alone: 3 / 5. And the result: g1 -> (0, 5)."""
    w1, w2 = nn.Parameter(torch.tensor([1.0, 0.0])), nn.Parameter(torch.tensor([0.0, 2.0, 0.0]))
    w1.grad, w2.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0, 12.0])
    stats = OrthoGrad([w1, w2], foreach=foreach).step(compute_stats=True)
    assert stats.radial_fraction == pytest.approx(3 / 13, rel=1e-6)
    assert torch.allclose(w1.grad, torch.tensor([0.0, 5.0])) and torch.equal(w2.grad, torch.tensor([0.0, 0.0, 12.0]))
    w1.grad = torch.tensor([3.0, 4.0])
    assert OrthoGrad([w1], foreach=foreach).step(compute_stats=True).radial_fraction == pytest.approx(0.6, rel=1e-6)
    w1.grad = torch.tensor([3.0, 4.0])
    assert OrthoGrad([w1], foreach=foreach).step().radial_fraction is None  # no compute_stats


def test_radial_fraction_is_a_fraction_on_random_gradients() -> None:
    model = Shapes()
    orthograd = OrthoGrad(model.named_parameters())
    x, y = _batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    pairs = [(p.detach().double(), p.grad.double()) for p in model.parameters()]
    radial = sum(float((w * g).sum()) ** 2 / float(w.square().sum()) for w, g in pairs)
    full = sum(float(g.square().sum()) for _, g in pairs)
    stats = orthograd.step(compute_stats=True)
    assert 0.0 <= stats.radial_fraction <= 1.0
    assert stats.radial_fraction == pytest.approx(math.sqrt(radial / full), rel=1e-5)


@pytest.mark.parametrize("make", ["orthograd", "ema_stats"])
def test_finite_gradient_whose_float32_norm_overflows_does_not_crash(make: str) -> None:
    """Gradient values of 1e20 are finite in float32, but their squared norm overflows it. The transform must either
    transform them or skip the step with its warning, never crash (it raised a bare StopIteration: no tensor held
    the inf that the overflowed norm suggested)."""
    p = nn.Parameter(torch.randn(4, 5, generator=torch.Generator().manual_seed(4)))
    g = torch.randn(4, 5, generator=torch.Generator().manual_seed(5)) * 1e20
    p.grad = g.clone()
    assert bool(torch.isfinite(p.grad).all()) and not math.isfinite(float(p.grad.norm()))
    transform = OrthoGrad([p]) if make == "orthograd" else EMAFilter([p], alpha=0.9, lamb=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = transform.step(compute_stats=True)
    if stats.skipped_nonfinite:
        assert [w for w in caught if issubclass(w.category, RuntimeWarning)] and torch.equal(p.grad, g)
    else:
        expected = naive_orthograd(p, g) if make == "orthograd" else g.double() * 2
        assert bool(torch.isfinite(p.grad).all()) and rel(p.grad, expected) < 1e-5


# ---------------------------------------------------------------------------------------------- Lightning side


class SGDModel(TinyModel):
    """The scaffold's tiny model with plain SGD (no momentum), so that ``w_new = w_old - lr * g``."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


LR = 0.5


def assert_updates(run: Run, expected: list[Grads], lr: float = LR) -> None:
    """SGD: ``w_{k+1} = w_k - lr * expected_k`` for every recorded step and parameter (``None``: unchanged)."""
    after = [*run.raw.params[1:], {n: p.detach() for n, p in run.model.named_parameters()}]
    assert len(run.raw.params) == len(expected)
    for step, (w0, w1, exp) in enumerate(zip(run.raw.params, after, expected)):
        for name, g in exp.items():
            if g is None:
                assert torch.equal(w1[name], w0[name]), f"step {step} {name}: changed without a gradient"
            else:
                moved = (w0[name].double() - w1[name].double()) / lr
                torch.testing.assert_close(
                    moved, g.double(), rtol=1e-5, atol=1e-6, msg=lambda m, s=step, n=name: f"step {s} {n}: {m}"
                )


def expected_orthograd(run: Run) -> list[Grads]:
    return [naive_step(w, g) for w, g in zip(run.raw.params, run.raw.steps)]


def test_callback_optimizer_steps_on_the_transformed_gradient() -> None:
    """Raw gradients recorded before the callback, transformed ones after it: the reference ⊥Grad of the raw ones,
    and SGD moves every weight by exactly that. The frozen parameter is untouched, the 0-d ``scale`` never moves
    (its gradient becomes 0) and ``late`` has no gradient on its first batches."""
    model = SGDModel(lr=LR, late_from=2)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    run = fit(OrthoGradCallback(), model, max_steps=6)
    expected = expected_orthograd(run)
    assert len(run.filtered.steps) == 6
    for step, (got, exp) in enumerate(zip(run.filtered.steps, expected)):
        assert got.keys() == exp.keys()
        for name, g in exp.items():
            assert (got[name] is None) == (g is None), f"step {step} {name}"
            if g is not None:
                assert got[name].dtype == torch.float32 and rel(got[name], g) < 1e-5, f"step {step} {name}"
    assert run.raw.steps[0]["late"] is None and run.raw.steps[3]["late"] is not None
    assert all(s["frozen"] is None for s in run.filtered.steps)
    assert all(torch.equal(s["scale"], torch.zeros(())) for s in run.filtered.steps)
    assert_updates(run, expected)
    assert torch.equal(model.frozen, initial["frozen"]) and torch.equal(model.scale, initial["scale"])
    assert not torch.equal(model.net[0].weight, initial["net.0.weight"])


class StepSpy(Callback):
    """Wraps the transform's ``step`` at train start to record ``(global_step, compute_stats, stats)`` per call."""

    def __init__(self, callback: OrthoGradCallback) -> None:
        self.callback = callback
        self.calls: list[tuple[int, bool, OrthoGradStats]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        transform = self.callback.transform
        assert transform is not None
        original = transform.step

        def step(*args: Any, **kwargs: Any) -> Any:
            stats = original(*args, **kwargs)
            self.calls.append((trainer.global_step, bool(kwargs.get("compute_stats")), stats))
            return stats

        transform.step = step  # type: ignore[method-assign]


class CountBackward(Callback):
    def __init__(self) -> None:
        self.count = 0

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.count += 1


def test_accumulation_transforms_once_per_optimizer_step() -> None:
    """accumulate_grad_batches=4: one ⊥Grad per optimizer step, on the accumulated gradient (⊥Grad is not
    additive, so transforming each micro-batch would give other updates)."""
    callback = OrthoGradCallback()
    spy, backward = StepSpy(callback), CountBackward()
    run = fit(
        callback, SGDModel(lr=LR, batch_size=4), max_steps=4, accumulate_grad_batches=4, callbacks=[spy, backward]
    )
    assert run.trainer.global_step == 4 and backward.count == 16
    assert [c[0] for c in spy.calls] == [0, 1, 2, 3]
    assert_updates(run, expected_orthograd(run))


def test_value_clipping_acts_on_the_transformed_gradient() -> None:
    """gradient_clip_val with the "value" algorithm: the optimizer gets clamp(⊥Grad(g)), not ⊥Grad(clamp(g)).
    (Norm clipping cannot tell the order: ⊥Grad keeps every tensor's norm and commutes with a scale.)"""
    clip = 0.02
    run = fit(
        OrthoGradCallback(), SGDModel(lr=LR), max_steps=6, gradient_clip_val=clip, gradient_clip_algorithm="value"
    )
    expected = [{n: None if g is None else g.clamp(-clip, clip) for n, g in t.items()} for t in expected_orthograd(run)]
    wrong = [naive_step(w, {n: None if g is None else g.clamp(-clip, clip) for n, g in t.items()})
             for w, t in zip(run.raw.params, run.raw.steps)]  # fmt: skip
    assert sum(int((g.abs() > clip).sum()) for t in run.raw.steps for g in t.values() if g is not None) > 0
    assert max(rel(a[n], b[n]) for a, b in zip(expected, wrong) for n in a if a[n] is not None and b[n].any()) > 0.1
    assert_updates(run, expected)


class TwoOptimizers(L.LightningModule):
    """Manual optimization: ``a`` and ``b`` have their own SGD (lr 1); every batch steps ``a``, then ``b``, and
    records whether each gradient is what it should be at that moment."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)
        self.automatic_optimization = False
        self.checks: list[tuple[str, str, bool]] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        opt_a, opt_b = self.optimizers()
        x, y = batch
        opt_a.zero_grad()
        opt_b.zero_grad()
        self.manual_backward(nn.functional.mse_loss(self.b(torch.tanh(self.a(x))).sum(-1, keepdim=True), y))
        w0 = {n: p.detach().clone() for n, p in self.named_parameters()}
        raw = {n: p.grad.clone() for n, p in self.named_parameters()}
        opt_a.step()
        for name, p in self.named_parameters():
            if name.startswith("a."):
                self.checks.append(("a stepped", name, rel(p.grad, naive_orthograd(w0[name], raw[name])) < 1e-5))
                self.checks.append(("a moved", name, torch.allclose(p.detach(), w0[name] - p.grad, atol=1e-7)))
            else:
                self.checks.append(("b waits", name, torch.equal(p.grad, raw[name]) and torch.equal(p, w0[name])))
        opt_b.step()
        for name, p in self.named_parameters():
            if name.startswith("b."):
                self.checks.append(("b stepped", name, rel(p.grad, naive_orthograd(w0[name], raw[name])) < 1e-5))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.a.parameters(), lr=1.0), torch.optim.SGD(self.b.parameters(), lr=1.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(regression_data(), batch_size=8)


def test_manual_optimization_transforms_only_the_stepped_optimizers_parameters() -> None:
    module = TwoOptimizers()
    make_trainer(callbacks=[OrthoGradCallback()], max_steps=-1, max_epochs=1, limit_train_batches=3).fit(module)
    assert len(module.checks) == 3 * (2 * 2 + 2 + 2)
    failed = [c for c in module.checks if not c[2]]
    assert not failed, failed


class SaveWeights(Callback):
    """Each rank writes its final weights to ``folder/rank{r}.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
        torch.save(weights, Path(self.folder) / f"rank{trainer.global_rank}.pt")


class RankModel(SGDModel):
    """Rank ``r`` of 2 trains on samples ``8k + 4r .. 8k + 4r + 3`` at step ``k``: together the ranks see the
    single process's batch ``8k .. 8k + 7`` (batch size 8)."""

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank
        keep = [i for i in range(len(self.data)) if (i // 4) % 2 == rank]
        return DataLoader(torch.utils.data.Subset(self.data, keep), batch_size=4, shuffle=False)


def test_ddp_ranks_stay_identical_and_equal_a_single_process(tmp_path: Path) -> None:
    """2 processes (gloo), each on half of every global batch: the hook sees the all-reduced gradient, so both
    ranks end with bit-identical weights, equal to one process on the whole batch (and not to a run without the
    callback); the frozen parameter stays as it was."""
    steps = 5
    trainer = make_trainer(
        callbacks=[OrthoGradCallback(), SaveWeights(str(tmp_path))],
        max_steps=steps,
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=False,
    )
    trainer.fit(RankModel(lr=LR))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = fit(OrthoGradCallback(), SGDModel(lr=LR), max_steps=steps).model
    plain = fit(None, SGDModel(lr=LR), max_steps=steps).model
    single_w = {n: p.detach() for n, p in single.named_parameters()}
    assert rank0.keys() == single_w.keys()
    for name in single_w:
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], single_w[name], rtol=1e-5, atol=1e-6)
    assert torch.equal(rank0["frozen"], SGDModel().frozen)
    assert any(not torch.allclose(single_w[n], p, atol=1e-4) for n, p in plain.named_parameters())


def test_radial_fraction_is_logged_on_logging_steps_only(tmp_path: Path) -> None:
    """log_every_n_steps=3 over 9 steps: the statistic is computed on steps 2, 5, 8 only, logged there, and equals
    |radial part| / |g| over the raw gradients recorded at those steps."""
    steps, every = 9, 3
    callback = OrthoGradCallback()
    spy = StepSpy(callback)
    logger = CSVLogger(tmp_path, name="orthograd")
    run = fit(callback, SGDModel(lr=0.2), max_steps=steps, logger=logger, log_every_n_steps=every, callbacks=[spy])
    logging_steps = [k for k in range(steps) if (k + 1) % every == 0]
    assert [(k, flag) for k, flag, _ in spy.calls] == [(k, k in logging_steps) for k in range(steps)]
    assert all((s.radial_fraction is None) == (k not in logging_steps) for k, _, s in spy.calls)
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    key = "orthograd/radial_fraction"
    logged = {int(r["step"]): float(r[key]) for r in rows if r.get(key)}
    assert sorted(logged) == logging_steps
    assert {r["orthograd/skipped_steps"] for r in rows if r.get("orthograd/skipped_steps")} == {"0.0"}
    for k in logging_steps:
        w, g = run.raw.params[k], run.raw.steps[k]
        radial = sum(float((w[n].double() * t.double()).sum()) ** 2 / float(w[n].double().square().sum())
                     for n, t in g.items() if t is not None)  # fmt: skip
        full = sum(float(t.double().square().sum()) for t in g.values() if t is not None)
        assert 0.0 < logged[k] < 1.0
        assert logged[k] == pytest.approx(math.sqrt(radial / full), rel=1e-5)


@pytest.mark.parametrize("orthograd_first", [False, True], ids=["grokfast_first", "orthograd_first"])
def test_composition_with_grokfast_is_ema_then_orthograd_whatever_the_order(orthograd_first: bool) -> None:
    """Listed in either order, the Trainer gives the weights of a plain loop running EMAFilter on the raw gradient
    and then OrthoGrad on the filtered one (the other order gives other weights)."""
    steps, alpha, lamb = 8, 0.8, 2.0
    pair: list[Callback] = [GrokfastCallback(alpha=alpha, lamb=lamb), OrthoGradCallback()]
    got = fit(None, SGDModel(lr=0.2), max_steps=steps, callbacks=pair[::-1] if orthograd_first else pair).model

    def plain(ema_first: bool) -> dict[str, Tensor]:
        model = SGDModel(lr=0.2)
        opt = model.configure_optimizers()
        ema, ortho = EMAFilter(model.named_parameters(), alpha, lamb), OrthoGrad(model.named_parameters())
        for i, batch in zip(range(steps), model.train_dataloader()):
            opt.zero_grad()
            model.training_step(batch, i).backward()
            for t in (ema, ortho) if ema_first else (ortho, ema):
                t.step()
            opt.step()
        return {n: p.detach() for n, p in model.named_parameters()}

    right, wrong = plain(True), plain(False)
    for name, p in got.named_parameters():
        torch.testing.assert_close(p.detach(), right[name], rtol=1e-6, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    assert any(not torch.allclose(p, wrong[n], atol=1e-4) for n, p in got.named_parameters())


def test_composition_order_gives_bit_identical_weights() -> None:
    weights = []
    for order in (1, -1):
        pair: list[Callback] = [GrokfastCallback(alpha=0.9, lamb=1.0), OrthoGradCallback()]
        model = fit(None, SGDModel(lr=0.2), max_steps=5, callbacks=pair[::order]).model
        weights.append({n: p.detach() for n, p in model.named_parameters()})
    for name, p in weights[0].items():
        assert torch.equal(p, weights[1][name]), name


def test_two_orthograd_callbacks_are_refused_in_setup_naming_both() -> None:
    trainer = make_trainer(callbacks=[OrthoGradCallback(), OrthoGradCallback(apply_to="matrices")], max_steps=1)
    model = SGDModel()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError) as err:
        trainer.fit(model)
    message = str(err.value)
    assert "OrthoGradCallback(apply_to='all')" in message and "OrthoGradCallback(apply_to='matrices')" in message
    assert trainer.global_step == 0
    assert all(torch.equal(p, initial[n]) for n, p in model.named_parameters())


class HugeLossAt(SGDModel):
    """Multiplies the loss of batch 2 by 1e30: finite float32 gradients whose squared norm overflows."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return super().training_step(batch, batch_idx) * (1e30 if batch_idx == 2 else 1.0)


@pytest.mark.parametrize("kind", ["orthograd", "grokfast"])
def test_an_overflowing_gradient_norm_does_not_silently_end_the_epoch(tmp_path: Path, kind: str) -> None:
    """A StopIteration escaping ``on_before_optimizer_step`` is taken by Lightning's loop for the end of the data:
    the epoch ends early without an error. Every batch of the epoch must still be trained on."""
    callback = OrthoGradCallback() if kind == "orthograd" else GrokfastCallback()
    backward = CountBackward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(
            callbacks=[callback, backward], max_steps=-1, max_epochs=1, logger=CSVLogger(tmp_path), log_every_n_steps=1
        )
        trainer.fit(HugeLossAt(lr=1e-40))
    assert backward.count == 8, f"the epoch ended after {backward.count} of 8 batches"
    assert trainer.global_step == 8  # without a GradScaler the optimizer steps even when the transform skips
    assert callback.transform is not None and callback.transform.skipped_steps <= 1

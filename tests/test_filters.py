"""Properties of the plain filters that parity over a few steps cannot show."""

from __future__ import annotations

import pytest
import torch

from lightning_grokfast import EMAFilter, MAFilter


@pytest.mark.parametrize("foreach", [None, False])
def test_ma_running_sum_does_not_drift(foreach: bool | None) -> None:
    """The running sum is recomputed from the ring each time it comes round, so rounding never piles up."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(64))
    f = MAFilter([p], window_size=5, lamb=1.0, foreach=foreach)
    worst = 0.0
    for step in range(1, 2001):
        p.grad = torch.randn(64) * 100 + 1e4  # a large mean makes float32 drift visible quickly
        f.step()
        state = f.state["0"]
        exact = state["window"].double().sum(0)
        worst = max(worst, float((state["sum"].double() - exact).abs().max() / exact.abs().max()))
        if step % 5 == 0:
            assert torch.equal(state["sum"], state["window"].sum(0)), step
    assert worst < 1e-6


def test_ema_step_allocates_no_state() -> None:
    """The EMA updates its state tensors in place: the same storage from the first step on."""
    p = torch.nn.Parameter(torch.zeros(3, 4))
    f = EMAFilter([("p", p)])
    p.grad = torch.ones(3, 4)
    f.step()
    ptr = f.state["p"]["mu"].data_ptr()
    for _ in range(5):
        p.grad = torch.randn(3, 4)
        f.step()
        assert f.state["p"]["mu"].data_ptr() == ptr


def test_state_bytes() -> None:
    p, q = torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(2, 3))
    ema, ma = EMAFilter([p, q]), MAFilter([p, q], window_size=7)
    p.grad, q.grad = torch.ones(10), torch.ones(2, 3)
    ema.step()
    ma.step()
    assert ema.state_bytes() == 16 * 4
    assert ma.state_bytes() == (7 + 1) * 16 * 4


def test_nonfinite_step_is_skipped_and_names_the_parameter() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    f = EMAFilter([("a", a), ("b", b)], alpha=0.5, lamb=1.0)
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    f.step()
    before = {k: v["mu"].clone() for k, v in f.state.items()}
    a.grad, b.grad = torch.ones(2), torch.tensor([1.0, float("inf")])
    with pytest.warns(RuntimeWarning, match="gradient of 'b' holds inf or NaN"):
        stats = f.step()
    assert stats.skipped_nonfinite and not stats.applied and f.skipped_steps == 1
    assert torch.equal(a.grad, torch.ones(2)) and torch.isinf(b.grad[1])
    assert all(torch.equal(f.state[k]["mu"], before[k]) for k in before)
    b.grad = torch.tensor([float("nan"), 1.0])
    f.step()  # no second warning; counted
    assert f.skipped_steps == 2
    unchecked = EMAFilter([("a", a)], skip_nonfinite=False)
    a.grad = torch.tensor([float("nan"), 1.0])
    assert unchecked.step().applied  # the user asked for no check: the NaN goes into the state
    assert torch.isnan(unchecked.state["a"]["mu"][0])

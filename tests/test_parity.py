"""In a real Trainer, the filtered gradients equal the naive reference replayed on the raw ones.

A recorder before ``GrokfastCallback`` sees the raw gradients, one after it the filtered ones (``helpers.fit``).
The package runs in float32; every filtered tensor must agree with the float64 reference to 1e-6 of the size
of the filter's operands, ``max|a - b| <= 1e-6 * max(|g| + lamb * slow(|g|))``: against ``max|b|`` alone, a
one-element tensor where ``g`` and ``lamb * slow`` nearly cancel would show float32 rounding, not a bug.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import GradRecorder, Run, TinyModel, assert_grads_close, assert_state_equal, fit, max_rel_diff, replay
from helpers import reference as ref
from lightning.pytorch.loggers import CSVLogger

from lightning_grokfast import GrokfastCallback

STEPS, LATE_FROM = 32, 3  # 4 epochs of 8 batches; TinyModel.late gets a gradient from batch 3 of every epoch on
EMA_CASES = [(0.98, 2.0, None), (0.8, 0.1, None), (0.5, 5.0, None), (0.0, 1.0, None), (0.9, 2.0, False)]
MA_CASES = [(w, wu, red, None) for w in (1, 3, 7) for wu in (True, False) for red in ("mean", "sum")]
MA_CASES += [(3, True, "sum", False), (7, False, "mean", False)]


def run(steps: int = STEPS, late_from: int | None = LATE_FROM, logger: Any = False, **config: Any) -> Run:
    """Fit TinyModel with ``GrokfastCallback(**config)``, checking at every step that no state aliases a
    ``.grad`` and that the raw recorder saw exactly what ``backward()`` produced."""
    produced = GradRecorder(hook="on_after_backward")
    model = TinyModel(late_from=late_from)
    result = fit(GrokfastCallback(**config), model, steps, True, callbacks=[produced], logger=logger)
    assert len(result.raw.steps) == len(result.filtered.steps) == steps
    assert_state_equal(result.raw.steps, produced.steps)
    return result


def check_gradient_pattern(result: Run) -> None:
    """``late`` has a gradient only from batch LATE_FROM of each epoch on, ``frozen`` never, the others always."""
    for k, (raw, filtered) in enumerate(zip(result.raw.steps, result.filtered.steps)):
        assert (raw["late"] is None) == (filtered["late"] is None) == (k % 8 < LATE_FROM), k
        assert raw["frozen"] is None and filtered["frozen"] is None
        for name in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "scale"):
            assert raw[name] is not None and filtered[name] is not None


def assert_first_is_one_plus_lamb_times_raw(result: Run, lamb: float, names: tuple[str, ...]) -> None:
    """The first filtered gradient of each of ``names`` (``late`` from its first) is ``(1 + lamb) * g``."""
    for name in names:
        k = LATE_FROM if name == "late" else 0
        raw, filtered = result.raw.steps[k][name], result.filtered.steps[k][name]
        torch.testing.assert_close(filtered, (1 + lamb) * raw, rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize(("alpha", "lamb", "foreach"), EMA_CASES)
def test_ema_matches_reference(alpha: float, lamb: float, foreach: bool | None) -> None:
    result = run(alpha=alpha, lamb=lamb, foreach=foreach)
    check_gradient_pattern(result)
    assert_grads_close(result.filtered.steps, result.raw.steps, "ema", alpha=alpha, lamb=lamb)
    assert_first_is_one_plus_lamb_times_raw(result, lamb, ("net.0.weight", "late"))


@pytest.mark.parametrize(("window_size", "warmup", "reduction", "foreach"), MA_CASES)
def test_ma_matches_reference(window_size: int, warmup: bool, reduction: str, foreach: bool | None) -> None:
    """And with warm-up the first ``window_size - 1`` gradients of each parameter are left bit for bit; without
    (or with a window of 1) the first is ``(1 + lamb) * g``: a one-gradient window's mean (and sum) is g."""
    kwargs = {"window_size": window_size, "lamb": 2.0, "warmup": warmup, "reduction": reduction}
    result = run(filter="ma", foreach=foreach, **kwargs)
    check_gradient_pattern(result)
    assert_grads_close(result.filtered.steps, result.raw.steps, "ma", **kwargs)
    if not warmup or window_size == 1:
        assert_first_is_one_plus_lamb_times_raw(result, 2.0, ("net.0.weight",))
        return
    for name, k in (("net.0.weight", 0), ("net.2.bias", window_size - 2), ("late", LATE_FROM)):
        assert torch.equal(result.filtered.steps[k][name], result.raw.steps[k][name]), (name, k)


@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_lamb_zero_leaves_raw_gradients_bit_for_bit(kind: str) -> None:
    result = run(filter=kind, alpha=0.9, lamb=0.0, window_size=3, warmup=False)
    check_gradient_pattern(result)
    assert_state_equal(result.filtered.steps, result.raw.steps)


def test_filter_is_active() -> None:
    """Guard for the set-up: with lamb > 0 the filtered gradients differ from the raw ones."""
    raw, filtered, *_ = run(steps=4, alpha=0.9, lamb=2.0)
    assert max_rel_diff([{"w": raw.steps[2]["net.0.weight"]}], [{"w": filtered.steps[2]["net.0.weight"]}]) > 0.1


@pytest.mark.parametrize(
    ("kind", "kwargs"), [("ema", {"alpha": 0.9, "lamb": 2.0}), ("ma", {"window_size": 3, "lamb": 2.0, "warmup": False})]
)
def test_diagnostics_do_not_change_gradients(tmp_path: Path, kind: str, kwargs: dict[str, Any]) -> None:
    """With a logger the statistics are computed at every step; the filtered gradients stay exact."""
    result = run(logger=CSVLogger(tmp_path), filter=kind, log_diagnostics=True, **kwargs)
    assert "grokfast/amplification" in result.trainer.callback_metrics  # the statistics did run
    check_gradient_pattern(result)
    assert_grads_close(result.filtered.steps, result.raw.steps, kind, **kwargs)


@pytest.mark.parametrize(
    ("kind", "kwargs"), [("ema", {"alpha": 0.9, "lamb": 2.0}), ("ma", {"window_size": 5, "lamb": 5.0, "warmup": True})]
)
def test_gradients_reused_in_place_change_nothing(kind: str, kwargs: dict[str, Any]) -> None:
    """``zero_grad(set_to_none=False)`` (the ``.grad`` tensors refilled in place) changes no gradient, weight or
    state. Every parameter has a gradient at every step, so no zeros stand in for a missing one."""
    runs = [fit(GrokfastCallback(filter=kind, **kwargs), TinyModel(set_to_none=s), 20, True) for s in (True, False)]
    assert all(runs[0].model.zeroed_to_none) and not any(runs[1].model.zeroed_to_none[1:])  # the override took
    for a, b in (
        (runs[0].raw.steps, runs[1].raw.steps),
        (runs[0].filtered.steps, runs[1].filtered.steps),
        (runs[0].model.state_dict(), runs[1].model.state_dict()),
        (runs[0].raw.of.state_dict(), runs[1].raw.of.state_dict()),
    ):
        assert_state_equal(a, b)
    assert runs[0].raw.of.grad_filter.state
    assert_grads_close(runs[0].filtered.steps, runs[0].raw.steps, kind, **kwargs)


@pytest.mark.parametrize(
    ("kind", "kwargs"), [("ema", {"alpha": 0.9, "lamb": 5.0}), ("ma", {"window_size": 3, "lamb": 5.0, "warmup": True})]
)
def test_state_is_built_from_raw_gradients_not_filtered_ones(kind: str, kwargs: dict[str, Any]) -> None:
    raw, filtered, *_ = run(steps=16, filter=kind, **kwargs)
    good, bad = replay(ref(kind, **kwargs), raw.steps), replay(ref(kind, feedback=True, **kwargs), raw.steps)
    assert max_rel_diff(bad, good) > 0.1 and max_rel_diff(filtered.steps, bad) > 0.1
    assert_grads_close(filtered.steps, raw.steps, kind, **kwargs)

"""The plain-PyTorch filters against the naive references, driven by hand with random gradients."""

from __future__ import annotations

import gc
import os
from typing import Any

import pytest
import torch
from helpers import (
    Grads,
    NaiveEMA,
    NaiveMA,
    assert_grads_close,
    assert_no_alias,
    assert_state_equal,
    max_rel_diff,
    replay,
    snapshot,
)
from helpers import reference as ref
from torch import nn

from lightning_grokfast import EMAFilter, MAFilter

FOREACH = pytest.mark.parametrize("foreach", [None, False], ids=["foreach", "loop"])
CASES: list[tuple[str, dict[str, Any]]] = [
    ("ema", {"alpha": 0.98, "lamb": 2.0}),
    ("ema", {"alpha": 0.5, "lamb": 5.0}),
    ("ema", {"alpha": 0.0, "lamb": 1.0}),
    ("ma", {"window_size": 1, "lamb": 5.0, "warmup": True, "reduction": "mean"}),
    ("ma", {"window_size": 4, "lamb": 5.0, "warmup": True, "reduction": "mean"}),
    ("ma", {"window_size": 4, "lamb": 0.5, "warmup": False, "reduction": "sum"}),
    ("ma", {"window_size": 5, "lamb": 2.0, "warmup": False, "reduction": "mean"}),
    ("ma", {"window_size": 3, "lamb": 2.0, "warmup": True, "reduction": "sum"}),
]
EMA, MA = CASES[0], CASES[4]


def case_id(case: tuple[str, dict[str, Any]]) -> str:
    return case[0] + "-" + "-".join(f"{k}={v}" for k, v in case[1].items())


def make_params() -> list[tuple[str, nn.Parameter]]:
    """Parameters of several shapes (0-d included), a late one and a frozen one."""
    gen = torch.Generator().manual_seed(1)
    shapes = {"w": (3, 4), "b": (5,), "s": (), "t": (2, 3, 2), "late": (4,)}
    params = [(name, nn.Parameter(torch.randn(shape, generator=gen))) for name, shape in shapes.items()]
    return [*params, ("frozen", nn.Parameter(torch.randn(3, generator=gen), requires_grad=False))]


def absent(name: str, step: int) -> bool:
    """``late`` has no gradient before step 3 and at every 4th step, ``frozen`` none."""
    return name == "frozen" or (name == "late" and (step < 3 or step % 4 == 0))


def random_grads(params: list[tuple[str, nn.Parameter]], steps: int) -> list[Grads]:
    """A drifting mean plus noise, where not :func:`absent`."""
    gen = torch.Generator().manual_seed(2)
    return [
        {n: None if absent(n, k) else torch.randn(p.shape, generator=gen, dtype=p.dtype) + 0.1 * k for n, p in params}
        for k in range(steps)
    ]


def make_filter(kind: str, params: list[tuple[str, nn.Parameter]], named: bool = True, **kwargs: Any) -> Any:
    source = iter(params) if named else (p for _, p in params)
    return (EMAFilter if kind == "ema" else MAFilter)(source, **kwargs)


def drive(filt: Any, params: list[tuple[str, nn.Parameter]], raw: list[Grads], subsets: Any = None) -> list[Grads]:
    """Per step: fresh copies of the raw gradients, ``step`` (on ``subsets[k]`` names if given), record; no state
    tensor may share storage with a ``.grad``."""
    out, by_name = [], dict(params)
    for k, grads in enumerate(raw):
        for name, p in params:
            p.grad = None if grads[name] is None else grads[name].clone()
        subset = (subsets or {}).get(k)
        filt.step(None if subset is None else [by_name[n] for n in subset])
        out.append(snapshot(params))
        assert_no_alias(filt, [p for _, p in params])
    return out


# ---------------------------------------------------------------------------------------------- the references


@pytest.mark.parametrize(
    ("naive", "expected"),
    [
        (NaiveEMA(alpha=0.5, lamb=2.0), [3.0, 7.0, -2.0]),  # mu = 1, 2, 0: g + 2 mu
        (NaiveMA(window_size=2, lamb=1.0, warmup=True), [1.0, 5.0, -1.5]),
        (NaiveMA(window_size=2, lamb=1.0, warmup=False, reduction="sum"), [2.0, 7.0, -1.0]),
        (
            NaiveMA(window_size=2, lamb=1.0, warmup=False, feedback=True),
            [2.0, 5.5, -0.25],
        ),  # windows [2], [2, 5.5], [5.5, -2]
    ],
    ids=["ema", "ma-warmup", "ma-sum", "ma-feedback"],
)
def test_reference_on_hand_computed_values(naive: Any, expected: list[float]) -> None:
    assert [naive.step({"p": torch.tensor([g])})["p"].item() for g in (1.0, 3.0, -2.0)] == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("named", [True, False], ids=["named", "unnamed"])
@FOREACH
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_filter_matches_reference(case: tuple[str, dict[str, Any]], foreach: bool | None, named: bool) -> None:
    kind, kwargs = case
    params = make_params()
    raw = random_grads(params, steps=14)
    got = drive(make_filter(kind, params, named, foreach=foreach, **kwargs), params, raw)
    assert_grads_close(got, raw, kind, **kwargs)  # a parameter without a gradient stays without one


@FOREACH
def test_ema_state_bytes_grow_with_each_parameters_first_gradient(foreach: bool | None) -> None:
    params = make_params()
    raw = random_grads(params, steps=8)
    filt, nbytes = make_filter("ema", params, foreach=foreach), {n: 4 * p.numel() for n, p in params}
    for k, grads in enumerate(raw):
        drive(filt, params, [grads])
        had = {n for step in raw[: k + 1] for n, g in step.items() if g is not None}
        assert filt.state_bytes() == sum(nbytes[n] for n in had), k


@FOREACH
@pytest.mark.parametrize("case", [EMA, MA], ids=case_id)
def test_step_on_a_subset_leaves_the_others_raw_and_their_state_kept(case: Any, foreach: bool | None) -> None:
    kind, kwargs = case
    params = make_params()
    raw = random_grads(params, steps=14)
    subsets = dict.fromkeys([1, 2, 5, 8, 9, 10], ("w", "s", "late"))
    got = drive(make_filter(kind, params, foreach=foreach, **kwargs), params, raw, subsets)
    seen = [{n: None if n not in subsets.get(k, (n,)) else g for n, g in grads.items()} for k, grads in enumerate(raw)]
    for k, grads in enumerate(raw):
        for name in [n for n, g in seen[k].items() if g is None and grads[n] is not None]:
            assert torch.equal(got[k].pop(name), grads[name]), (k, name)  # outside the subset: the raw gradient
            got[k][name] = None
    assert_grads_close(got, seen, kind, **kwargs)


@FOREACH
@pytest.mark.parametrize("case", [("ema", {"alpha": 0.9, "lamb": 2.0}), ("ma", {"window_size": 3, "lamb": 2.0})])
def test_float64_parameter_among_float32_ones(case: Any, foreach: bool | None) -> None:
    kind, kwargs = case
    params = make_params()
    params.insert(2, ("d", nn.Parameter(torch.randn(4, 2, dtype=torch.float64))))
    raw = random_grads(params, steps=8)
    got = drive(make_filter(kind, params, foreach=foreach, **kwargs), params, raw)
    assert_grads_close(got, raw, kind, **kwargs)  # d stays float64 and matches the float64 reference


@FOREACH
@pytest.mark.parametrize(
    "case", [("ema", {"alpha": 0.9, "lamb": 5.0}), ("ma", {"window_size": 3, "lamb": 5.0, "warmup": True})]
)
def test_state_is_built_from_raw_gradients_not_filtered_ones(case: Any, foreach: bool | None) -> None:
    kind, kwargs = case
    params = make_params()
    raw = random_grads(params, steps=10)
    got = drive(make_filter(kind, params, named=False, foreach=foreach, **kwargs), params, raw)
    good, bad = replay(ref(kind, **kwargs), raw), replay(ref(kind, feedback=True, **kwargs), raw)
    assert max_rel_diff(bad, good) > 0.1 and max_rel_diff(got, bad) > 0.1
    assert_grads_close(got, raw, kind, **kwargs)


def plain_training(kind: str, set_to_none: bool, foreach: bool | None, **kwargs: Any) -> tuple[nn.Module, Any]:
    """15 steps of zero_grad(set_to_none) -> backward -> filter.step -> SGD step; no state aliases a ``.grad``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    filt = make_filter(kind, list(model.named_parameters()), foreach=foreach, **kwargs)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)
    for _ in range(15):
        opt.zero_grad(set_to_none=set_to_none)
        nn.functional.mse_loss(model(x), y).backward()
        filt.step()
        assert_no_alias(filt, model.parameters())
        opt.step()
    return model, filt


@FOREACH
@pytest.mark.parametrize(
    "case", [("ema", {"alpha": 0.9, "lamb": 2.0}), ("ma", {"window_size": 5, "lamb": 5.0, "warmup": True})]
)
def test_gradients_reused_in_place_change_nothing(case: Any, foreach: bool | None) -> None:
    """``zero_grad(set_to_none=False)`` refills the same ``.grad`` tensors: same weights, same filter state."""
    (model_a, filt_a), (model_b, filt_b) = (plain_training(case[0], s, foreach, **case[1]) for s in (True, False))
    assert_state_equal(model_a.state_dict(), model_b.state_dict())
    assert_state_equal(filt_a.state_dict(), filt_b.state_dict())


# ---------------------------------------------------------------------------------------------- state


@FOREACH
def test_ma_running_sum_does_not_drift(foreach: bool | None) -> None:
    """The running sum is recomputed from the ring each time it comes round, so rounding never piles up."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(64))
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


def test_ema_updates_its_state_in_place() -> None:
    p = nn.Parameter(torch.zeros(3, 4))
    f = EMAFilter([("p", p)])
    p.grad = torch.ones(3, 4)
    f.step()
    ptr = f.state["p"]["mu"].data_ptr()
    for _ in range(5):
        p.grad = torch.randn(3, 4)
        f.step()
        assert f.state["p"]["mu"].data_ptr() == ptr


@pytest.mark.parametrize(("kind", "copies"), [("ema", 1), ("ma", 7 + 1)])
def test_state_bytes(kind: str, copies: int) -> None:
    p, q = nn.Parameter(torch.zeros(10)), nn.Parameter(torch.zeros(2, 3))
    f = EMAFilter([p, q]) if kind == "ema" else MAFilter([p, q], window_size=7)
    p.grad, q.grad = torch.ones(10), torch.ones(2, 3)
    f.step()
    assert f.state_bytes() == copies * 16 * 4


def test_nonfinite_step_is_skipped_and_names_the_parameter() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    f = EMAFilter([("a", a), ("b", b)], alpha=0.5, lamb=1.0)
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    f.step()
    before = {k: v["mu"].clone() for k, v in f.state.items()}
    a.grad, b.grad = torch.ones(2), torch.tensor([1.0, float("inf")])
    with pytest.warns(RuntimeWarning, match="gradient of 'b' holds inf or NaN"):
        stats = f.step()
    assert stats.skipped_nonfinite and not stats.applied and f.skipped_steps == 1
    assert torch.equal(a.grad, torch.ones(2)) and torch.isinf(b.grad[1])
    assert_state_equal({k: v["mu"] for k, v in f.state.items()}, before)
    b.grad = torch.tensor([float("nan"), 1.0])
    f.step()  # counted
    assert f.skipped_steps == 2


def test_nonfinite_goes_into_the_state_when_not_checked() -> None:
    a = nn.Parameter(torch.zeros(2))
    unchecked = EMAFilter([("a", a)], skip_nonfinite=False)
    a.grad = torch.tensor([float("nan"), 1.0])
    assert unchecked.step().applied
    assert torch.isnan(unchecked.state["a"]["mu"][0])


# ---------------------------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize(("kind", "copies"), [("ema", 1), ("ma", 10 + 1)])
def test_memory_is_flat_over_thousands_of_steps(kind: str, copies: int) -> None:
    """3000 steps: constant state bytes and tensor count, no autograd graph kept, flat process RSS."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=1e-3)
    filt = EMAFilter(model.named_parameters(), 0.98, 2.0) if kind == "ema" else MAFilter(model.named_parameters(), 10)
    x, y = torch.randn(16, 32), torch.randn(16, 32)
    rss_warm = 0
    for step in range(1, 3001):
        opt.zero_grad()
        nn.functional.mse_loss(model(x + 0.01 * step), y).backward()
        filt.step()
        opt.step()
        assert filt.state_bytes() == copies * sum(4 * p.numel() for p in params), step
        if step == 1 or step % 250 == 0:
            tensors = [v for s in filt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
            assert len(tensors) == len(params) * (1 if kind == "ema" else 2), step
            assert all(not t.requires_grad and t.grad_fn is None for t in tensors), step
            assert all(p.grad is not None and p.grad.grad_fn is None for p in params)
        if step == 500:
            gc.collect()
            rss_warm = rss_bytes()
    gc.collect()
    # A leak of one gradient-sized copy per step would add 2500 * 16 KiB, about 40 MiB.
    assert rss_bytes() - rss_warm < 4 * 2**20

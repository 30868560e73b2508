"""The plain-PyTorch transforms (``EMAFilter``, ``MAFilter``, ``OrthoGrad``) driven by hand, without a Trainer.

Checked against naive float64 references: ``NaiveEMA``/``NaiveMA`` (``helpers``) and :func:`naive_orthograd` (here).
By behaviour: 1. arguments, the import; 2. filter parity (both code paths, named or not, subsets, float64 among
float32, state from raw gradients); 3. ⊥Grad parity, edge rules; 4. 16-bit gradients; 5. steps that transform
nothing (non-finite, repeated or no gradients); 6. state (size, memory, loading); 7. GradScaler, Fabric; 8. stats.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import inspect
import math
import os
import re
import subprocess
import sys
import warnings
from typing import Any, Optional

import helpers as h
import numpy as np
import pytest
import torch
from helpers import Grads, assert_grads_close, assert_no_alias, assert_state_equal, naive_orthograd, snapshot
from torch import Tensor, nn

import lightning_grokfast as lg
from lightning_grokfast import EMAFilter, EMASettings, MAFilter, MASettings, OrthoGrad, OrthoGradSettings

FOREACH = pytest.mark.parametrize("foreach", [None, False], ids=["foreach", "loop"])
HALF = (torch.bfloat16, torch.float16)
DTYPES = [torch.float32, torch.float64, *HALF]
KINDS: dict[str, Any] = {"ema": EMAFilter, "ma": MAFilter, "orthograd": OrthoGrad}
ARGS: dict[str, Any] = {"ema": {"alpha": 0.9, "lamb": 2}, "ma": {"window_size": 2, "lamb": 2}, "orthograd": {}}
CASES: list[tuple[str, dict[str, Any]]] = [
    *[("ema", {"alpha": alpha, "lamb": lamb}) for alpha, lamb in ((0.98, 2.0), (0.5, 5.0), (0.0, 1.0))],
    *[("ma", {"window_size": w, "lamb": lamb, "warmup": warmup, "reduction": r}) for w, lamb, warmup, r in (
        (1, 5.0, True, "mean"), (4, 5.0, True, "mean"), (4, 0.5, False, "sum"), (5, 2.0, False, "mean"),
        (3, 2.0, True, "sum"))],
]  # fmt: skip
P, SHAPES = nn.Parameter(torch.zeros(2)), {"matrix": (6, 5), "vector": (7,), "cube": (2, 3, 4), "conv": (4, 3, 3, 3)}


def make_params() -> list[tuple[str, nn.Parameter]]:
    """Parameters of several shapes (0-d included), a float64 one, a late one and a frozen one."""
    gen = torch.Generator().manual_seed(1)
    shapes = {"w": (3, 4), "b": (5,), "d": (4, 2), "s": (), "t": (2, 3, 2), "late": (4,), "frozen": (3,)}
    return [(n, nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64 if n == "d" else None), n != "frozen"))
            for n, s in shapes.items()]  # fmt: skip


def random_grads(params: list[tuple[str, nn.Parameter]], steps: int) -> list[Grads]:
    """A drifting mean plus noise; ``late`` has none before step 3 and at every 4th step, ``frozen`` none."""
    gen = torch.Generator().manual_seed(2)
    absent = [{"frozen", *(["late"] if k < 3 or k % 4 == 0 else [])} for k in range(steps)]
    return [{n: None if n in absent[k] else torch.randn(p.shape, generator=gen, dtype=p.dtype) + 0.1 * k
             for n, p in params} for k in range(steps)]  # fmt: skip


def drive(filt: Any, params: list[tuple[str, nn.Parameter]], raw: list[Grads], subsets: Any = None) -> list[Grads]:
    """Per step: fresh copies of ``raw``, ``step`` (on ``subsets[k]`` if given), record; no state aliases .grad."""
    out, by_name = [], dict(params)
    for k, grads in enumerate(raw):
        for name, p in params:
            p.grad = None if grads[name] is None else grads[name].clone()
        subset = (subsets or {}).get(k)
        filt.step(None if subset is None else [by_name[n] for n in subset])
        out.append(snapshot(params))
        assert_no_alias(filt, [p for _, p in params])
    return out


def mlp(seed: int = 0, compiled: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    if compiled:  # aot_eager: dynamo + AOTAutograd; inductor's first C++ build takes ~40 s
        model[0] = torch.compile(model[0], backend="aot_eager")
    return model


def loss(model: Any, seed: int, scale: float = 1.0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * nn.functional.mse_loss(model(torch.randn(16, 4, generator=gen)), torch.randn(16, 3, generator=gen))


def shaped(dtype: torch.dtype = torch.float32) -> list[tuple[str, nn.Parameter]]:
    """Parameters of the shapes of :data:`SHAPES`."""
    gen = torch.Generator().manual_seed(0)
    return [(n, nn.Parameter((0.5 * torch.randn(s, generator=gen)).to(dtype))) for n, s in SHAPES.items()]


def fresh_grads(params: list[tuple[str, nn.Parameter]], seed: int) -> None:
    """New random gradients, in each parameter's dtype."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def rel(actual: Tensor, expected: Tensor) -> float:
    """``max |actual - expected| / max |expected|`` in float64."""
    a, b = actual.detach().double(), expected.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def norm(tensors: Any) -> float:
    """The global L2 norm of ``tensors``, in float64."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


# ---------------------------------------------------------------------------------------------- 1. arguments
NUMBER, NONNEG, INTEGER, FLAG = "a number in [0, 1)", "a finite number >= 0", "an integer >= 1", "True or False"
BAD: list[tuple[type, str, Any, str]] = [
    *[(EMASettings, "alpha", v, NUMBER) for v in (1.0, -0.1, math.nan, "0.9")],
    *[(EMASettings, "lamb", v, NONNEG) for v in (-1.0, math.nan)],
    *[(MASettings, "lamb", v, NONNEG) for v in (math.inf, "2")],
    *[(MASettings, "window_size", v, INTEGER) for v in (0, 2.5)],
    *[(MASettings, "warmup", v, FLAG) for v in ("yes", None)],
    *[(MASettings, "reduction", v, "one of 'mean', 'sum'") for v in ("median", "max")],
    *[(c, "fp32_state", v, FLAG) for c, v in ((EMASettings, "no"), (MASettings, 1))],
    *[(c, "skip_nonfinite", v, FLAG) for c, v in ((EMASettings, None), (MASettings, 0), (OrthoGradSettings, "no"))],
    *[(c, "foreach", v, FLAG) for c, v in ((EMASettings, "auto"), (MASettings, 0), (OrthoGradSettings, 1))],
    *[(OrthoGradSettings, "apply_to", v, "one of 'all', 'matrices'") for v in ("matrix", "All", "vectors", None)],
]
TRANSFORM_OF = {EMASettings: EMAFilter, MASettings: MAFilter, OrthoGradSettings: OrthoGrad}


@pytest.mark.parametrize(("cls", "name", "value", "accepted"), BAD, ids=lambda v: getattr(v, "__name__", repr(v))[:16])
def test_bad_argument_is_refused_naming_what_is_accepted(cls: type, name: str, value: Any, accepted: str) -> None:
    """By the settings dataclass and the transform's constructor (and ``OrthoGradCallback``, for ``apply_to``)."""
    makers: list[Any] = [cls, lambda **kw: TRANSFORM_OF[cls]([P], **kw)]
    makers += [lg.OrthoGradCallback] if name == "apply_to" else []
    for maker in makers:
        with pytest.raises(ValueError) as err:
            maker(**{name: value})
        assert f"`{name}` must be {accepted}" in str(err.value) and f"got {value!r}" in str(err.value)


def test_settings_accept_the_edges_are_frozen_and_build_the_transform() -> None:
    """``from_settings`` builds what the constructor builds; every setting is checked in :data:`BAD` and is a
    constructor argument; a transform refuses another transform's settings."""
    ema = EMASettings(0, 0, foreach=False)
    assert (ema.alpha, ema.lamb, type(ema.alpha), type(ema.lamb)) == (0.0, 0.0, float, float)
    for settings, kwargs in (
        (ema, {"alpha": 0, "lamb": 0, "foreach": False}),
        (MASettings(1, 0, False, "sum"), {"window_size": 1, "lamb": 0, "warmup": False, "reduction": "sum"}),
        (OrthoGradSettings("matrices", skip_nonfinite=False), {"apply_to": "matrices", "skip_nonfinite": False}),
    ):
        cls = TRANSFORM_OF[type(settings)]
        transform = cls.from_settings([P], settings)
        assert type(transform) is cls and transform.settings == settings == cls([P], **kwargs).settings
        names = {f.name for f in dataclasses.fields(settings)}
        assert names == {n for c, n, _, _ in BAD if c is type(settings)}, "a setting missing from BAD"
        assert names == set(inspect.signature(cls).parameters) - {"params"}, "not a constructor argument"
    with pytest.raises(dataclasses.FrozenInstanceError):
        ema.alpha = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError, match="EMAFilter takes EMASettings, got MASettings"):
        EMAFilter.from_settings([P], MASettings())


@pytest.mark.parametrize("name", ["alpha", "lamb", "window_size"])
def test_numpy_scalars_are_stored_as_python_numbers_and_booleans_refused(name: str, tmp_path: Any) -> None:
    """A sweep's numpy values are numbers, stored as Python ones (so that the state loads with
    ``weights_only=True``); ``True`` and ``np.bool_(True)`` are not, though ``True`` passes an ``int`` check."""
    value = {"alpha": np.float32(0.9), "lamb": np.float32(1.5), "window_size": np.int64(10)}[name]
    cls, p = MAFilter if name == "window_size" else EMAFilter, nn.Parameter(torch.ones(3))
    f = cls([p], **{name: value})
    assert type(getattr(f.settings, name)) is type(value.item()) and getattr(f.settings, name) == value.item()
    p.grad = torch.ones(3)
    f.step()
    assert all(type(v) in (int, float, bool, str) for v in f.state_dict()["hparams"].values())
    torch.save(f.state_dict(), tmp_path / "state.pt")
    f.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for bad in (True, np.bool_(True)):
        with pytest.raises(ValueError, match=f"`{name}`"):
            cls([p], **{name: bad})


def test_bad_params_are_refused_at_construction_and_at_step() -> None:
    """Empty, mixed, a name twice, not tensors; at ``step``, an unregistered parameter and a sparse gradient."""
    bad = [([], "`params` is empty"), ([P, ("b", P)], "not a mix"), ([("a", 3.0)], "must hold tensors"),
           ([("a", P), ("a", nn.Parameter(torch.zeros(1)))], "names 'a' twice")]  # fmt: skip
    for params, message in bad:
        with pytest.raises(ValueError, match=message):
            EMAFilter(params)
    f, q = EMAFilter([("p", P)]), nn.Parameter(torch.zeros(3))
    q.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"shape \(3,\).*not registered"):
        f.step([q])
    emb = nn.Embedding(5, 2, sparse=True)
    g = EMAFilter(emb.named_parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="'weight' has a sparse gradient"):
        g.step()


def test_import_does_not_import_lightning_until_a_callback_is_used() -> None:
    code = """if True:
        import sys, lightning_grokfast
        from lightning_grokfast import EMAFilter, MAFilter, OrthoGrad
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning"))
        assert not loaded and "lightning_grokfast.callback" not in sys.modules, loaded
        assert lightning_grokfast.GrokfastCallback.__name__ == "GrokfastCallback" and "lightning" in sys.modules
        assert not hasattr(lightning_grokfast, "NoSuchThing")"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------- 2. filter parity
@pytest.mark.parametrize(
    ("naive", "expected"),
    [(h.NaiveEMA(alpha=0.5, lamb=2.0), [3.0, 7.0, -2.0]),  # mu = 1, 2, 0: g + 2 mu
     (h.NaiveMA(window_size=2, lamb=1.0, warmup=True), [1.0, 5.0, -1.5]),
     (h.NaiveMA(window_size=2, lamb=1.0, warmup=False, reduction="sum"), [2.0, 7.0, -1.0]),
     (h.NaiveMA(window_size=2, lamb=1.0, warmup=False, feedback=True), [2.0, 5.5, -0.25])],  # windows of g_hat
    ids=["ema", "ma-warmup", "ma-sum", "ma-feedback"],
)  # fmt: skip
def test_reference_on_hand_computed_values(naive: Any, expected: list[float]) -> None:
    assert [naive.step({"p": torch.tensor([g])})["p"].item() for g in (1.0, 3.0, -2.0)] == pytest.approx(expected)


@pytest.mark.parametrize("named", [True, False], ids=["named", "unnamed"])
@FOREACH
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0] + "-" + "-".join(f"{k}={v}" for k, v in c[1].items()))
def test_filter_matches_reference(case: tuple[str, dict[str, Any]], foreach: Optional[bool], named: bool) -> None:
    """Every tensor and step within rounding of the reference (float64 stays float64, no gradient stays none); where
    the state matters (alpha > 0, window > 1), far from the variant whose state is built from filtered gradients."""
    kind, kwargs = case
    params = make_params()
    raw = random_grads(params, steps=14)
    got = drive(KINDS[kind](iter(params) if named else (p for _, p in params), foreach=foreach, **kwargs), params, raw)
    assert_grads_close(got, raw, kind, **kwargs)
    if kwargs.get("alpha", 1.0) > 0 and kwargs.get("window_size", 2) > 1:
        assert h.max_rel_diff(got, h.replay(h.reference(kind, feedback=True, **kwargs), raw)) > 0.1


@FOREACH
@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=["ema", "ma"])
def test_step_on_a_subset_leaves_the_others_raw_and_their_state_kept(case: Any, foreach: Optional[bool]) -> None:
    kind, kwargs = case
    params = make_params()
    raw = random_grads(params, steps=14)
    subsets = dict.fromkeys([1, 2, 5, 8, 9, 10], ("w", "s", "late"))
    got = drive(KINDS[kind](params, foreach=foreach, **kwargs), params, raw, subsets)
    seen = [{n: None if n not in subsets.get(k, (n,)) else g for n, g in grads.items()} for k, grads in enumerate(raw)]
    for k, grads in enumerate(raw):
        for name in [n for n, g in seen[k].items() if g is None and grads[n] is not None]:
            assert torch.equal(got[k].pop(name), grads[name]), (k, name)  # outside the subset: the raw gradient
            got[k][name] = None
    assert_grads_close(got, seen, kind, **kwargs)


@FOREACH
@pytest.mark.parametrize("case", [("ema", {"alpha": 0.9, "lamb": 2.0}), ("ma", {"window_size": 5, "lamb": 5.0})])
def test_gradients_refilled_in_place_change_nothing(case: Any, foreach: Optional[bool]) -> None:
    """``zero_grad(set_to_none=False)`` refills the same ``.grad`` tensors: same weights and state, bit for bit."""
    runs = []
    for set_to_none in (True, False):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        filt = KINDS[case[0]](model.named_parameters(), foreach=foreach, **case[1])
        for _ in range(15):
            opt.zero_grad(set_to_none=set_to_none)
            loss(model, 3).backward()
            filt.step()
            assert_no_alias(filt, model.parameters())
            opt.step()
        runs.append((model.state_dict(), filt.state_dict()))
    assert_state_equal(runs[0], runs[1])


# ---------------------------------------------------------------------------------------------- 3. ⊥Grad
@FOREACH
@pytest.mark.parametrize("named", [True, False], ids=["named", "unnamed"])
def test_orthograd_matches_the_definition_over_a_training_loop(foreach: Optional[bool], named: bool) -> None:
    """Every step of an SGD loop: each new gradient is the definition's, orthogonal to ``w``, of norm |g|; the
    ``radial_fraction`` statistic is |radial part| / |g| over the raw gradients."""
    params = shaped()
    orthograd = OrthoGrad(params if named else [p for _, p in params], foreach=foreach)
    opt = torch.optim.SGD([p for _, p in params], lr=0.05, momentum=0.5)
    for step in range(6):
        fresh_grads(params, 10 + step)
        ws, raw = {n: p.detach().double() for n, p in params}, snapshot(params)
        stats = orthograd.step(compute_stats=True)
        radial = [(ws[n] * g.double()).sum() / ws[n].norm() for n, g in raw.items()]
        assert stats.applied and stats.num_tensors == len(SHAPES) and 0 < stats.radial_fraction < 1
        assert stats.radial_fraction == pytest.approx(norm(radial) / norm(raw.values()), rel=1e-5)
        for name, p in params:
            g, g0, w = p.grad.double(), raw[name], ws[name]
            assert p.grad.dtype == g0.dtype and rel(g, naive_orthograd(w, g0)) < 1e-5, f"step {step} {name}"
            assert abs(float((w * g).sum() / (w.norm() * g.norm()))) < 1e-6, f"step {step} {name}: not orthogonal"
            assert float(g.norm()) == pytest.approx(norm([g0]), rel=1e-6)
        opt.step()


@FOREACH
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_orthograd_zero_weight_and_one_element_rules(foreach: Optional[bool], dtype: torch.dtype) -> None:
    """In one group with a normal tensor: a zero weight leaves its gradient bit-identical (no direction to remove);
    a 0-d or one-element parameter has no direction orthogonal to itself, so its gradient becomes exactly 0."""
    gen = torch.Generator().manual_seed(0)
    zero, other = nn.Parameter(torch.zeros(5, 7, dtype=dtype)), nn.Parameter(torch.randn(3, 4, generator=gen).to(dtype))
    s, one = nn.Parameter(torch.tensor(0.7, dtype=dtype)), nn.Parameter(torch.tensor([-1.3], dtype=dtype))
    g = torch.randn(5, 7, generator=gen).to(dtype)
    zero.grad, other.grad = g.clone(), torch.randn(3, 4, generator=gen).to(dtype)
    s.grad, one.grad = torch.tensor(0.3, dtype=dtype), torch.tensor([2.9], dtype=dtype)
    expected = naive_orthograd(other, other.grad)
    OrthoGrad([zero, s, one, other], foreach=foreach).step()
    assert torch.equal(zero.grad, g) and rel(other.grad, expected) < (1e-2 if dtype in HALF else 1e-5)
    assert s.grad.dtype == one.grad.dtype == dtype and not s.grad.any() and not one.grad.any() and s.grad.dim() == 0


@FOREACH
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("c", [0.3, -2.7, 1e-3, 123.0])
def test_radial_gradient_becomes_exactly_zero(foreach: Optional[bool], dtype: torch.dtype, c: float) -> None:
    """``g = c * w`` (rounded): no orthogonal direction; the rounding residue must not be rescaled to ``|g|``. Also
    for a tensor of a million values (a 1000 x 1000 layer), where float32 sums carry the most rounding."""
    gen = torch.Generator().manual_seed(1)
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in [*SHAPES.values(), (1000, 1000)]]
    for p in params:
        p.grad = c * p.detach()
    fraction = OrthoGrad(params, foreach=foreach).step(compute_stats=True).radial_fraction
    assert fraction <= 1 and fraction == pytest.approx(1, rel=1e-4)
    for p in params:
        assert torch.equal(p.grad, torch.zeros_like(p)), f"shape {tuple(p.shape)}: max {p.grad.abs().max()}"


@FOREACH
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_radial_gradient_of_a_16bit_parameter_becomes_zero(foreach: Optional[bool], dtype: torch.dtype) -> None:
    """``g = round16(c * w)`` is radial up to 16-bit rounding (residue ~1e-3 of |g|): it must become 0, as must an
    exactly radial one (``c`` a power of two), while an orthogonal part of 5% is kept and rescaled to |g|."""
    gen = torch.Generator().manual_seed(2)
    w, exact = (nn.Parameter(torch.randn(64, 32, generator=gen).to(dtype)) for _ in range(2))
    w.grad, exact.grad = (0.3 * w.detach().double()).to(dtype), 0.5 * exact.detach()
    g0, w64 = w.grad.double(), w.detach().double()
    assert (g0 - (w64 * g0).sum() / w64.square().sum() * w64).norm() / g0.norm() < 4 * torch.finfo(dtype).eps
    OrthoGrad([w, exact], foreach=foreach).step()
    assert not exact.grad.any() and not w.grad.any(), f"residue amplified to |g|: max {w.grad.abs().max().item():.3g}"
    other = torch.randn(64, 32, generator=gen).double()
    other -= (other * w64).sum() / w64.square().sum() * w64
    w.grad = (w64 + 0.05 * other * w64.norm() / other.norm()).to(dtype)
    expected = naive_orthograd(w, w.grad)
    OrthoGrad([w], foreach=foreach).step()
    assert w.grad.any() and rel(w.grad, expected) < 0.05


@FOREACH
def test_orthograd_agrees_with_pytorch_optimizer(foreach: Optional[bool]) -> None:
    """On non-degenerate gradients the update equals ``pytorch_optimizer.OrthoGrad(SGD)``'s."""
    po = pytest.importorskip("pytorch_optimizer")
    ours, theirs = shaped(), shaped()
    opts = [torch.optim.SGD(dict(ours).values(), lr=0.1), po.OrthoGrad(torch.optim.SGD(dict(theirs).values(), lr=0.1))]
    orthograd = OrthoGrad(ours, foreach=foreach)
    for step in range(4):
        fresh_grads(ours, step)
        fresh_grads(theirs, step)
        orthograd.step()
        for opt in opts:
            opt.step()
        for (name, a), (_, b) in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, s=step, n=name: f"{s} {n}: {m}")
    assert not torch.equal(ours[0][1], shaped()[0][1])  # it trained


def test_apply_to_matrices_transforms_only_tensors_of_two_or_more_dims() -> None:
    gen = torch.Generator().manual_seed(3)
    shapes = {"matrix": (4, 3), "conv": (2, 3, 2, 2), "bias": (4,), "gain": ()}
    params = {n: nn.Parameter(torch.randn(shape, generator=gen)) for n, shape in shapes.items()}
    raw = {n: torch.randn(p.shape, generator=gen) for n, p in params.items()}
    for apply_to, transformed in (("matrices", {"matrix", "conv"}), ("all", set(shapes))):
        for name, p in params.items():
            p.grad = raw[name].clone()
        assert OrthoGrad(params.items(), apply_to=apply_to).step().num_tensors == len(transformed)
        for name, p in params.items():  # "all": the scalar's gradient becomes 0
            expected = naive_orthograd(p, raw[name]).float() if name in transformed else raw[name]
            assert torch.equal(p.grad, expected) if name == "gain" else rel(p.grad, expected) < 1e-5, name


# ---------------------------------------------------------------------------------------------- 4. 16-bit
@FOREACH
def test_bfloat16_ema_keeps_moving_with_float32_state(foreach: Optional[bool]) -> None:
    """First g = 1.0, then 200 steps of g = bf16(1.1) with alpha 0.98 (lamb 0): mu climbs to ~1.0998. In bfloat16
    each update (0.02 * 0.1 = 0.002) is below half an ulp of 1.0 (0.0039) and mu never leaves 1.0."""
    alpha, steps, one, g1 = 0.98, 200, torch.ones(4, dtype=torch.bfloat16), torch.full((4,), 1.1, dtype=torch.bfloat16)
    p = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    wide, narrow = (EMAFilter([p], alpha, 0.0, fp32_state=fp32, foreach=foreach) for fp32 in (True, False))
    for f in (wide, narrow):
        for k in range(steps + 1):
            p.grad = (g1 if k else one).clone()
            f.step()
            assert p.grad.dtype == torch.bfloat16 and torch.equal(p.grad, g1 if k else one)  # lamb 0: unchanged
    expected = float(g1[0]) + (1.0 - float(g1[0])) * alpha**steps  # 1.0998
    assert abs(expected - 1.098) < 0.005 and wide.state["0"]["mu"].dtype == torch.float32
    torch.testing.assert_close(wide.state["0"]["mu"].double(), torch.full((4,), expected).double(), rtol=0, atol=1e-5)
    assert torch.equal(narrow.state["0"]["mu"], one)


@FOREACH
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_orthograd_16bit_result_is_the_exact_one_rounded_once(foreach: Optional[bool], dtype: torch.dtype) -> None:
    """The float64 result on the same 16-bit inputs, cast once: within one ulp everywhere and equal almost
    everywhere (computing in 16 bits would be off by many ulps); the gradients keep their dtype."""
    params = shaped(dtype)
    orthograd, total, exact = OrthoGrad(params, foreach=foreach), 0, 0
    for step in range(3):
        fresh_grads(params, step)
        expected = {n: naive_orthograd(p, p.grad).to(dtype) for n, p in params}
        orthograd.step()
        for name, p in params:
            a, b, finfo = p.grad.double(), expected[name].double(), torch.finfo(dtype)
            off = (a - b).abs() / (finfo.eps * torch.maximum(a.abs(), b.abs())).clamp_min(finfo.tiny)  # in ulps
            assert p.grad.dtype == dtype and float(off.max()) <= 1.0, f"step {step} {name}: {float(off.max())} ulps"
            total, exact = total + off.numel(), exact + int((off == 0).sum())
            p.data -= 0.05 * p.grad
    assert exact >= 0.98 * total, f"only {exact}/{total} values equal the once-rounded result"


# ---------------------------------------------------------------------------------------------- 5. nothing to transform
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_gradient_skips_the_step_with_one_warning(kind: str, bad: float) -> None:
    """State and every gradient stay bit for bit; the first skip warns naming the parameter, later ones are counted;
    the next finite step is transformed, silently. Without ``skip_nonfinite`` the bad value goes through."""
    params = shaped()[:2]
    f, v = KINDS[kind](params, **ARGS[kind]), params[1][1]
    fresh_grads(params, 1)
    f.step()
    state = copy.deepcopy(f.state_dict()["state"])
    fresh_grads(params, 2)
    v.grad[1] = bad
    before = snapshot(params)
    with pytest.warns(RuntimeWarning, match="gradient of 'vector' holds inf or NaN") as record:
        stats = [f.step(compute_stats=True), f.step()]
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    assert stats == [type(stats[0])(applied=False, skipped_nonfinite=True)] * 2 and f.skipped_steps == 2
    bits = [{n: g.view(torch.int32) for n, g in grads.items()} for grads in (snapshot(params), before)]
    assert_state_equal((bits[0], f.state_dict()["state"]), (bits[1], state))
    v.grad[1] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert f.step().applied and f.skipped_steps == 2
    unchecked, v.grad = KINDS[kind](params[1:], skip_nonfinite=False, **ARGS[kind]), torch.full_like(v, bad)
    assert unchecked.step().applied
    assert not torch.isfinite(v.grad if kind == "orthograd" else next(iter(unchecked.state["vector"].values()))).all()


@pytest.mark.parametrize("write", ["mul_(1)", "new .grad", "increment_version"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_that_nothing_wrote_since_the_last_step_are_left_alone(kind: str, write: str) -> None:
    """After a step only ``a`` is written (values unchanged): the next step transforms it as a new gradient, leaves
    ``b`` and its state alone and warns naming ``b`` only. Then nothing written (an optimizer stepping twice on one
    backward): a no-op, bit for bit, counted silently. ``c`` never has a gradient: it gets none and no state."""
    params = [(n, p) for n, (_, p) in zip("abc", shaped())]
    (_, a), (_, b), (_, c) = params
    f = KINDS[kind](params, **ARGS[kind])
    fresh_grads(params[:2], 0)
    raw = [snapshot(params)]
    assert f.step().num_tensors == 2 and c.grad is None and "c" not in f.state
    got, b_state = [snapshot(params)], copy.deepcopy(f.state.get("b"))
    {"mul_(1)": lambda: a.grad.mul_(1), "new .grad": lambda: setattr(a, "grad", a.grad.clone()),
     "increment_version": lambda: torch.autograd.graph.increment_version([a.grad])}[write]()  # fmt: skip
    raw.append({"a": a.grad.clone(), "b": None, "c": None})
    with pytest.warns(RuntimeWarning, match=r"gradient of 'b' is the one it already transformed \(") as record:
        stats = f.step()
    assert len(record) == 1 and stats.applied and stats.num_tensors == 1 and f.repeated_steps == 1
    got.append({"a": a.grad.clone(), "b": None, "c": None})
    assert torch.equal(b.grad, got[0]["b"])
    assert_state_equal(f.state.get("b"), b_state)  # None for the stateless ⊥Grad
    if kind == "orthograd":
        assert rel(a.grad, naive_orthograd(a, raw[1]["a"])) < 1e-5
    else:
        assert_grads_close(got, raw, kind, **ARGS[kind])
    grads, state = snapshot(params), copy.deepcopy(f.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stats = f.step(compute_stats=True)
    assert stats == type(stats)(applied=False) and f.repeated_steps == 2
    assert_state_equal((snapshot(params), f.state_dict()), (grads, state))


@pytest.mark.parametrize("kind", ["orthograd", "ema"])
def test_finite_gradient_whose_float32_norm_overflows_does_not_crash(kind: str) -> None:
    """Values of 1e20 are finite in float32 but their squared norm overflows: the transform either transforms them
    or skips the step with its warning, never crashes (no tensor holds the inf the overflowed norm suggests)."""
    p = nn.Parameter(torch.randn(4, 5, generator=torch.Generator().manual_seed(4)))
    g = torch.randn(4, 5, generator=torch.Generator().manual_seed(5)) * 1e20
    p.grad = g.clone()
    assert bool(torch.isfinite(g).all()) and not math.isfinite(float(g.norm()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = (OrthoGrad([p]) if kind == "orthograd" else EMAFilter([p], 0.9, 1.0)).step(compute_stats=True)
    if stats.skipped_nonfinite:
        assert [w for w in caught if issubclass(w.category, RuntimeWarning)] and torch.equal(p.grad, g)
    else:
        expected = naive_orthograd(p, g) if kind == "orthograd" else g.double() * 2
        assert bool(torch.isfinite(p.grad).all()) and rel(p.grad, expected) < 1e-5


# ---------------------------------------------------------------------------------------------- 6. state
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_state_size_and_dtype(kind: str, dtype: torch.dtype) -> None:
    """``expected_state_bytes``, known up front, is one copy (EMA) or window_size + 1 (MA) of the parameters, float32
    for 16-bit ones unless ``fp32_state=False``; ``state_bytes`` counts those that had a gradient."""
    params = [(n, nn.Parameter(p.detach().to(dtype))) for n, p in make_params() if n not in ("d", "frozen")]
    for fp32_state in (True, False):
        state_dtype = torch.float32 if fp32_state and dtype in HALF else dtype
        f = KINDS[kind](params, fp32_state=fp32_state, **({} if kind == "ema" else {"window_size": 5}))
        size = {n: (1 if kind == "ema" else 6) * state_dtype.itemsize * p.numel() for n, p in params}
        assert f.expected_state_bytes() == sum(size.values()) and f.state_bytes() == 0
        raw = random_grads(params, steps=5)  # ``late`` from step 3
        for k, grads in enumerate(raw):
            assert all(g is None or g.dtype == dtype for g in drive(f, params, [grads])[0].values())
            assert f.state_bytes() == sum(size[n] for n in size if n != "late" or k >= 3), k
        assert f.state_bytes() == f.expected_state_bytes()
        assert {t.dtype for e in f.state.values() for t in e.values() if isinstance(t, Tensor)} == {state_dtype}


@pytest.mark.parametrize(("kind", "copies"), [("ema", 1), ("ma", 10 + 1)])
def test_state_is_updated_in_place_and_memory_is_flat_over_thousands_of_steps(kind: str, copies: int) -> None:
    """3000 steps: the same state tensors, of constant size, no autograd graph kept, flat process RSS (a leak of one
    gradient-sized copy per step would add 2500 * 16 KiB, about 40 MiB)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    filt = KINDS[kind](model.named_parameters(), **({"window_size": 10} if kind == "ma" else {}))
    x, y = torch.randn(16, 32), torch.randn(16, 32)
    rss, pointers, numel = [], [], sum(p.numel() for p in model.parameters())
    for step in range(1, 3001):
        opt.zero_grad()
        nn.functional.mse_loss(model(x + 0.01 * step), y).backward()
        filt.step()
        opt.step()
        assert filt.state_bytes() == copies * 4 * numel, step
        if step == 1 or step % 250 == 0:
            tensors = [v for s in filt.state.values() for v in s.values() if isinstance(v, Tensor)]
            pointers = pointers or [t.data_ptr() for t in tensors]
            assert [t.data_ptr() for t in tensors] == pointers, step
            grads = [p.grad for p in model.parameters()]  # all tensors (None has no requires_grad)
            assert not any(t.requires_grad or t.grad_fn is not None for t in tensors + grads), step
        if step in (500, 3000):
            gc.collect()
            with open("/proc/self/statm") as f:
                rss.append(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    assert rss[1] - rss[0] < 4 * 2**20


@FOREACH
def test_ma_running_sum_does_not_drift(foreach: Optional[bool]) -> None:
    """The running sum is recomputed from the ring each time it comes round, so rounding never piles up."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.zeros(64))
    f, worst = MAFilter([p], window_size=5, lamb=1.0, foreach=foreach), 0.0
    for step in range(1, 2001):
        p.grad = torch.randn(64) * 100 + 1e4  # a large mean makes float32 drift visible quickly
        f.step()
        ring, total = f.state["0"]["window"], f.state["0"]["sum"]
        worst = max(worst, rel(total, ring.double().sum(0)))
        assert step % 5 or torch.equal(total, ring.sum(0)), step
    assert worst < 1e-6


@pytest.mark.parametrize(
    ("kind", "needs"),
    [("ema", "268 B (one copy of 67 parameter values)"),
     ("ma", "26.4 KiB (window_size + 1 = 101 copies of 67 parameter values)")],
)  # fmt: skip
def test_a_state_that_cannot_fit_is_refused_first(monkeypatch: pytest.MonkeyPatch, kind: str, needs: str) -> None:
    """At the first step, before anything is allocated, naming the size (67 float32 values, once or 101 times), its
    rule and what to change."""
    monkeypatch.setattr("lightning_grokfast.transform.available_memory", lambda device: 100)
    model = mlp()
    loss(model, 0).backward()
    grads, args = snapshot(model.named_parameters()), {"window_size": 100} if kind == "ma" else {}
    f = KINDS[kind](model.named_parameters(), **args)
    with pytest.raises(MemoryError) as err:
        f.step()
    advice = "Use the EMA filter (one copy) or a smaller `window_size`." if kind == "ma" else "Keep 16-bit state"
    assert f"needs {needs}, but only 100 B is free on cpu." in str(err.value) and advice in str(err.value)
    assert not f.state
    assert_state_equal(snapshot(model.named_parameters()), grads)
    monkeypatch.setattr("lightning_grokfast.transform.available_memory", lambda device: 10**12)
    assert KINDS[kind](model.named_parameters(), **args).step().applied  # enough memory: accepted


@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_loading_a_state(kind: str) -> None:
    """Saved from a ``torch.compile``d module, keyed by plain names, it loads into the plain and the compiled module.
    With inf or NaN it is refused naming the parameter, loading nothing. The first step warns naming a parameter
    with a gradient but no entry (it starts fresh), not one without a gradient (frozen until now)."""
    model = mlp(compiled=True)
    assert any("_orig_mod." in n for n, _ in model.named_parameters())
    f = KINDS[kind](model.named_parameters(), **ARGS[kind])
    for seed in range(2):
        model.zero_grad()
        loss(model, seed).backward()
        f.step()
    saved = f.state_dict()
    assert set(saved["state"]) == {n for n, _ in mlp().named_parameters()}
    for compiled in (False, True):
        (target := KINDS[kind](mlp(compiled=compiled).named_parameters(), **ARGS[kind])).load_state_dict(saved)
        assert_state_equal(target.state, saved["state"])
    for bad in (math.nan, math.inf):
        poisoned = copy.deepcopy(saved)
        poisoned["state"]["2.weight"]["mu" if kind == "ema" else "window"].view(-1)[1] = bad
        target = KINDS[kind](model.named_parameters(), **ARGS[kind])
        with pytest.raises(ValueError, match=r"The state of '2\.weight' holds inf or NaN"):
            target.load_state_dict(poisoned)
        assert not target.state
    partial = {**saved, "state": {n: e for n, e in saved["state"].items() if n != "2.bias"}}
    for state, bias_grad, warns in ((saved, True, 0), (partial, False, 0), (partial, True, 1)):
        target = KINDS[kind](model.named_parameters(), **ARGS[kind])
        target.load_state_dict(state)
        model.zero_grad()
        loss(model, 2).backward()
        model[2].bias.grad = model[2].bias.grad if bias_grad else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            target.step()
        fresh = r"no entry for '2\.bias', which have a gradient now; their state starts fresh"
        assert len(caught) == warns and all(re.search(fresh, str(w.message)) for w in caught)


# ---------------------------------------------------------------------------------------------- 7. GradScaler, Fabric
def scaled_run(order: str, steps: int = 4, fabric: bool = False) -> tuple[EMAFilter, nn.Module]:
    """EMA + SGD with a CPU GradScaler (scale 1024): "scaler" passes it to ``step`` (with ``fabric`` only Fabric's
    optimizer), "manual" unscales first, "both" unscales first and passes it too."""
    scaler, model = torch.amp.GradScaler("cpu", init_scale=2.0**10), mlp()
    opt = inner = torch.optim.SGD(model.parameters(), lr=0.1)
    if fabric:  # "16-mixed" on CPU: fabric.backward leaves gradients scaled by its precision's scaler
        from lightning.fabric import Fabric
        from lightning.fabric.plugins import MixedPrecision

        runner = Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
        wrapped, opt = runner.setup(model, opt)
    f = EMAFilter(model.named_parameters(), alpha=0.9, lamb=2.0)
    for step in range(steps):
        opt.zero_grad()
        runner.backward(loss(wrapped, step)) if fabric else scaler.scale(loss(model, step)).backward()
        if order != "scaler":
            scaler.unscale_(inner)
        given = None if fabric and order == "scaler" else scaler  # with Fabric: only its optimizer
        f.step() if order == "manual" else f.step(scaler=given, optimizer=opt)
        opt.step() if fabric else (scaler.step(opt), scaler.update())
    assert scaler.get_scale() > 1  # the gradients were scaled throughout
    return f, model


def test_step_with_a_scaler_unscales_first_and_equals_the_manual_order() -> None:
    """The weights and state of ``unscale_`` then ``step()``, also after ``unscale_`` (not unscaled twice); ``mu`` is
    the unscaled gradient. Refused: a scaler without its optimizer; a step after ``scaler.step``."""
    manual = scaled_run("manual")
    for order in ("scaler", "both"):
        f, model = scaled_run(order)
        assert_state_equal((model.state_dict(), f.state_dict()), (manual[1].state_dict(), manual[0].state_dict()))
    f, model = scaled_run("scaler", steps=1)
    loss(model := mlp(), 0).backward()
    assert_state_equal({n: e["mu"] for n, e in f.state.items()}, snapshot(model.named_parameters()), 1e-5, 1e-7)
    scaler, opt = torch.amp.GradScaler("cpu"), torch.optim.SGD(model.parameters(), lr=0.1)
    scaler.scale(nn.functional.mse_loss(model(torch.ones(2, 4)), torch.zeros(2, 3))).backward()
    with pytest.raises(ValueError, match="`scaler` needs `optimizer`"):
        f.step(scaler=scaler)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match=r"after `scaler\.step\(optimizer\)`"):
        EMAFilter(model.parameters()).step(scaler=scaler, optimizer=opt)


def test_the_wrong_order_filters_scaled_gradients_wrongly_from_the_first_change_of_scale() -> None:
    """``scaler.scale(loss).backward(); step(); scaler.unscale_(optimizer)``, the README's wrong order: the EMA of
    scaled gradients is the algorithm's only while the scale stays; with ``growth_interval=1`` it doubles every step
    and the filtered gradients leave the algorithm at once. ⊥Grad, invariant to a scale, stays right."""
    errors: dict[str, list[float]] = {"ema": [], "orthograd": []}
    for kind in errors:
        model = mlp()
        opt, scaler = torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu", growth_interval=1)
        f = EMAFilter(model.parameters(), 0.9, 2.0) if kind == "ema" else OrthoGrad(model.parameters())
        ema, params = h.NaiveEMA(0.9, 2.0), dict(enumerate(model.parameters()))
        for step in range(5):
            opt.zero_grad()
            scaler.scale(loss(model, step)).backward()
            raw = {i: p.grad / scaler.get_scale() for i, p in params.items()}
            expected = ema.step(raw) if kind == "ema" else {i: h.naive_orthograd(p, raw[i]) for i, p in params.items()}
            f.step()
            scaler.unscale_(opt)  # too late
            errors[kind].append(h.max_rel_diff([{i: p.grad for i, p in params.items()}], [expected]))
            scaler.step(opt)
            scaler.update()
    assert errors["ema"][0] < 1e-6 and min(errors["ema"][1:]) > 0.3, errors  # README: 0.64, 1.05, 0.90, 0.91
    assert max(errors["orthograd"]) < 1e-5


@pytest.mark.parametrize("order", ["scaler", "both"])
def test_step_with_a_fabric_optimizer_takes_the_scaler_of_fabrics_precision(order: str) -> None:
    """``step(optimizer=fabric_optimizer)`` after ``fabric.backward`` ("16-mixed", CPU), or with the scaler after
    ``unscale_``: the weights and state of the manual order, so the gradients were unscaled once, before the filter."""
    (f, model), (manual_f, manual_model) = scaled_run(order, 3, fabric=True), scaled_run("manual", 3, fabric=True)
    assert not torch.equal(model[0].weight, mlp()[0].weight)  # the optimizer stepped
    assert_state_equal((model.state_dict(), f.state_dict()), (manual_model.state_dict(), manual_f.state_dict()))


# ---------------------------------------------------------------------------------------------- 8. statistics
def assert_stats(stats: Any, raw: list[Tensor], grads: list[Tensor]) -> None:
    """A filter step's statistics are the norms and cosine of the real tensors: raw, filtered and added."""
    added = [g.double() - r.double() for g, r in zip(grads, raw)]
    dot = sum(float((r.double() * s).sum()) for r, s in zip(raw, added))
    expected = (norm(raw), norm(grads), norm(added), norm(grads) / norm(raw))
    assert (stats.raw_norm, stats.filtered_norm, stats.slow_norm, stats.amplification) == pytest.approx(expected, 1e-5)
    assert -1 <= stats.cosine <= 1 and stats.cosine == pytest.approx(dot / (norm(raw) * norm(added)), 1e-5, 1e-6)


@FOREACH
def test_amplification_below_one_when_the_slow_component_opposes_the_gradient(foreach: Optional[bool]) -> None:
    """alpha 0.9, lamb 2: g (mu = g: cosine 1, amplification 3), then -g: mu = 0.8 g, g_hat = -g + 1.6 g = 0.6 g,
    so amplification 0.6 and cosine -1. Rounding must not push the cosine out of [-1, 1]."""
    for seed in range(10):
        params = [nn.Parameter(torch.zeros(shape)) for shape in [(8, 4), (8,), (3, 8), (3,)]]
        fresh_grads([("", p) for p in params], seed)
        raw, f = [p.grad.clone() for p in params], EMAFilter(params, alpha=0.9, lamb=2.0, foreach=foreach)
        for sign, amplification in ((1, 3.0), (-1, 0.6)):
            for p, g in zip(params, raw):
                p.grad = sign * g
            stats = f.step(compute_stats=True)
            assert_stats(stats, [sign * g for g in raw], [p.grad for p in params])
            assert stats.amplification == pytest.approx(amplification, rel=1e-5) and stats.cosine == pytest.approx(sign)
        assert_state_equal([p.grad for p in params], [0.6 * g for g in raw], 1.3e-6, 1e-5)


@FOREACH
@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_filter_statistics_are_the_norms_of_the_real_tensors(kind: str, foreach: Optional[bool]) -> None:
    """Over real gradients with a sign flip at step 5 (the slow part then opposes the gradient): the statistics,
    computed from |g|^2 + 2<g, s> + |s|^2, are those of the real tensors; the cosine is 1 at the first step (the slow
    part is g) and the amplification falls below 1 after the flip."""
    args = {"alpha": 0.7, "lamb": 3.0} if kind == "ema" else {"window_size": 3, "lamb": 4.0, "warmup": False}
    for seed in range(4):
        model = mlp(seed=seed)
        f, history = KINDS[kind](model.named_parameters(), foreach=foreach, **args), []
        for step in range(8):
            model.zero_grad()
            loss(model, 10 * seed + (step if step < 3 else 0), scale=1.0 if step < 5 else -1.0).backward()
            raw = [p.grad.clone() for p in model.parameters()]
            history.append(f.step(compute_stats=True))
            assert_stats(history[-1], raw, [p.grad for p in model.parameters()])
        assert history[0].cosine == pytest.approx(1.0) and history[0].amplification > 1
        assert min(s.amplification for s in history[5:]) < 1 and min(s.cosine for s in history[5:]) < 0


@FOREACH
def test_radial_fraction_by_hand(foreach: Optional[bool]) -> None:
    """w1 = (1, 0), g1 = (3, 4): radial part 3 of |g1| = 5. w2 = (0, 2, 0), g2 = (0, 0, 12): radial part 0.
    Over both: sqrt(3^2 + 0) / sqrt(5^2 + 12^2) = 3 / 13; alone 3 / 5; g1 -> (0, 5). None without compute_stats."""
    w1, w2 = nn.Parameter(torch.tensor([1.0, 0.0])), nn.Parameter(torch.tensor([0.0, 2.0, 0.0]))
    w1.grad, w2.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0, 12.0])
    assert OrthoGrad([w1, w2], foreach=foreach).step(compute_stats=True).radial_fraction == pytest.approx(3 / 13)
    assert torch.allclose(w1.grad, torch.tensor([0.0, 5.0])) and torch.equal(w2.grad, torch.tensor([0.0, 0.0, 12.0]))
    for compute_stats, expected in ((True, pytest.approx(0.6, rel=1e-6)), (False, None)):
        w1.grad = torch.tensor([3.0, 4.0])
        assert OrthoGrad([w1], foreach=foreach).step(compute_stats=compute_stats).radial_fraction == expected

"""The plain-PyTorch transforms (``EMAFilter``, ``MAFilter``, ``OrthoGrad``) driven by hand, without a Trainer.

Against naive float64 references (``NaiveEMA``, ``NaiveMA``, :func:`naive_orthograd` from ``helpers``), by behaviour:
1. arguments, the import; 2. filter parity (both code paths, named or not, subsets, refilled in place, float64 among
float32, state from raw gradients); 3. ⊥Grad parity (16-bit included), edge rules, peers; 4. steps that transform
nothing (non-finite, repeated or no gradients); 5. state (size, memory, 16-bit, loading); 6. GradScaler, Fabric;
7. statistics.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
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
from lightning.fabric import Fabric
from lightning.fabric.plugins import MixedPrecision
from torch import Tensor, nn

import lightning_grokfast as lg
from lightning_grokfast import EMAFilter, EMASettings, MAFilter, MASettings, OrthoGrad, OrthoGradSettings

FOREACH = pytest.mark.parametrize("foreach", [None, False], ids=["foreach", "loop"])
HALF, DTYPES = (torch.bfloat16, torch.float16), [torch.float32, torch.float64, torch.bfloat16, torch.float16]
KINDS: dict[str, Any] = {"ema": EMAFilter, "ma": MAFilter, "orthograd": OrthoGrad}
ARGS: dict[str, Any] = {"ema": {"alpha": 0.9, "lamb": 2}, "ma": {"window_size": 2, "lamb": 2}, "orthograd": {}}
MA_ARGS = ("window_size", "lamb", "warmup", "reduction")
CASES: list[tuple[str, dict[str, Any]]] = [
    *[("ema", {"alpha": alpha, "lamb": lamb}) for alpha, lamb in ((0.98, 2.0), (0.5, 5.0), (0.0, 1.0))],
    *[("ma", dict(zip(MA_ARGS, c))) for c in ((1, 5.0, True, "mean"), (4, 5.0, True, "mean"), (4, 0.5, False, "sum"))],
    *[("ma", dict(zip(MA_ARGS, c))) for c in ((5, 2.0, False, "mean"), (3, 2.0, True, "sum"))],
]
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


def drive(filt: Any, params: Any, raw: list[Grads], subsets: Any = None, in_place: bool = False) -> list[Grads]:
    """Per step: ``raw`` into fresh ``.grad``s (``in_place``: into the existing ones, as after
    ``zero_grad(set_to_none=False)``), ``step`` (on ``subsets[k]`` if given), record; no state aliases a ``.grad``."""
    out, by_name = [], dict(params)
    for k, grads in enumerate(raw):
        for name, p in params:
            if in_place and p.grad is not None and grads[name] is not None:
                p.grad.copy_(grads[name])
            else:
                p.grad = None if grads[name] is None else grads[name].clone()
        filt.step([by_name[n] for n in subsets[k]] if subsets and k in subsets else None)
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


def fresh_grads(params: Any, seed: int) -> None:
    """New random gradients, in each parameter's dtype, for ``(name, parameter)`` pairs."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


# ---------------------------------------------------------------------------------------------- 1. arguments
NUMBER, NONNEG, INTEGER, FLAG = "a number in [0, 1)", "a finite number >= 0", "an integer >= 1", "True or False"
BAD: list[tuple[type, str, Any, str]] = [  # booleans pass an ``int`` check
    *[(EMASettings, "alpha", v, NUMBER) for v in (1.0, -0.1, math.nan, "0.9", True, np.bool_(True))],
    *[(EMASettings, "lamb", v, NONNEG) for v in (-1.0, math.nan, True, np.bool_(True))],
    *[(MASettings, "lamb", v, NONNEG) for v in (math.inf, "2")],
    *[(MASettings, "window_size", v, INTEGER) for v in (0, 2.5, True, np.bool_(True))],
    *[(MASettings, "warmup", v, FLAG) for v in ("yes", None)],
    *[(MASettings, "reduction", v, "one of 'mean', 'sum'") for v in ("median", "max")],
    *[(c, "fp32_state", v, FLAG) for c, v in ((EMASettings, "no"), (MASettings, 1))],
    *[(c, "skip_nonfinite", v, FLAG) for c, v in ((EMASettings, None), (MASettings, 0), (OrthoGradSettings, "no"))],
    *[(c, "foreach", v, FLAG) for c, v in ((EMASettings, "auto"), (MASettings, 0), (OrthoGradSettings, 1))],
    *[(c, "fused", v, FLAG) for c, v in ((EMASettings, "yes"), (MASettings, 1), (OrthoGradSettings, "auto"))],
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


def test_settings_accept_the_edges_are_frozen_and_build_the_transform(tmp_path: Any) -> None:
    """``from_settings`` builds what the constructor builds; every setting is checked in :data:`BAD` and is a
    constructor argument; a transform refuses another transform's settings. A sweep's numpy numbers are stored as
    Python ones, so that the state loads with ``weights_only=True`` (numpy booleans: :data:`BAD`)."""
    ema = EMASettings(0, 0, foreach=False)
    assert (ema.alpha, ema.lamb, type(ema.alpha), type(ema.lamb)) == (0.0, 0.0, float, float)
    ma_args = {"window_size": np.int64(10), "lamb": np.float32(1.5), "warmup": False, "reduction": "sum"}
    for settings, kwargs in (
        (ema, {"alpha": np.float32(0), "lamb": 0, "foreach": False}),
        (MASettings(10, 1.5, False, "sum"), ma_args),
        (OrthoGradSettings("matrices", skip_nonfinite=False), {"apply_to": "matrices", "skip_nonfinite": False}),
    ):
        transform, made = (cls := TRANSFORM_OF[type(settings)]).from_settings([P], settings), cls([P], **kwargs)
        assert type(transform) is cls and transform.settings == settings == made.settings
        assert [type(v) for v in dataclasses.astuple(made.settings)] == [type(v) for v in dataclasses.astuple(settings)]
        torch.save(made.state_dict(), tmp_path / "state.pt")
        made.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
        names = {f.name for f in dataclasses.fields(settings)}
        assert names == {n for c, n, _, _ in BAD if c is type(settings)}, "a setting missing from BAD"
        assert names == set(inspect.signature(cls).parameters) - {"params"}, "not a constructor argument"
    with pytest.raises(dataclasses.FrozenInstanceError):
        ema.alpha = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError, match="EMAFilter takes EMASettings, got MASettings"):
        EMAFilter.from_settings([P], MASettings())


def test_bad_params_are_refused_at_construction_and_at_step() -> None:
    """Empty, mixed, a name twice, not tensors; at ``step``, an unregistered parameter and a sparse gradient."""
    bad = [([], "`params` is empty"), ([P, ("b", P)], "not a mix"), ([("a", 3.0)], "must hold tensors"),
           ([("a", P), ("a", nn.Parameter(torch.zeros(1)))], "names 'a' twice")]  # fmt: skip
    for params, message in bad:
        with pytest.raises(ValueError, match=message):
            EMAFilter(params)
    q, emb = nn.Parameter(torch.zeros(3)), nn.Embedding(5, 2, sparse=True)
    q.grad, f = torch.ones(3), EMAFilter(emb.named_parameters())
    with pytest.raises(ValueError, match=r"shape \(3,\).*not registered"):
        f.step([q])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="'weight' has a sparse gradient"):
        f.step()


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
def test_reference_on_hand_computed_values() -> None:
    for naive, expected in [(h.NaiveEMA(alpha=0.5, lamb=2.0), [3.0, 7.0, -2.0]),  # mu = 1, 2, 0: g + 2 mu
                            (h.NaiveMA(window_size=2, lamb=1.0, warmup=True), [1.0, 5.0, -1.5]),
                            (h.NaiveMA(2, 1.0, False, "sum"), [2.0, 7.0, -1.0]),  # next: windows of g_hat
                            (h.NaiveMA(2, 1.0, False, feedback=True), [2.0, 5.5, -0.25])]:  # fmt: skip
        assert [naive.step({"p": torch.tensor([g])})["p"].item() for g in (1.0, 3.0, -2.0)] == pytest.approx(expected)


@pytest.mark.parametrize("how", ["named", "unnamed", "subset", "in place"])
@FOREACH
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0] + "-" + "-".join(f"{k}={v}" for k, v in c[1].items()))
def test_filter_matches_reference(case: tuple[str, dict[str, Any]], foreach: Optional[bool], how: str) -> None:
    """Every tensor and step within rounding of the reference (float64 stays float64, no gradient stays none), far
    from the variant whose state is built from filtered gradients where the state matters. ``subset``: the others
    keep raw gradients and state. ``in place``: ``.grad``s refilled in place give the same, bit for bit."""
    kind, kwargs = case
    raw = random_grads(params := make_params(), steps=14)
    subsets = dict.fromkeys([1, 2, 5, 8, 9, 10], ("w", "s", "late")) if how == "subset" else {}
    seen = [{n: g if n in subsets.get(k, (n,)) else None for n, g in grads.items()} for k, grads in enumerate(raw)]
    made = KINDS[kind](iter(params) if how != "unnamed" else (p for _, p in params), foreach=foreach, **kwargs)
    got = drive(made, params, raw, subsets, in_place=how == "in place")
    if how == "in place":  # the same as with fresh ``.grad``s
        fresh = KINDS[kind](again := make_params(), foreach=foreach, **kwargs)
        assert_state_equal((drive(fresh, again, raw), fresh.state_dict()), (got, made.state_dict()))
    for k, grads in enumerate(raw):
        for name in [n for n, g in seen[k].items() if g is None and grads[n] is not None]:
            assert torch.equal(got[k][name], grads[name]), (k, name)  # outside the subset: the raw gradient
            got[k][name] = None
    assert_grads_close(got, seen, kind, **kwargs)
    if kwargs.get("alpha", 1.0) > 0 and kwargs.get("window_size", 2) > 1:
        assert h.max_rel_diff(got, h.replay(h.reference(kind, feedback=True, **kwargs), seen)) > 0.1


# ---------------------------------------------------------------------------------------------- 3. ⊥Grad
@FOREACH
@pytest.mark.parametrize(("dtype", "how"), [(torch.float32, "named"), (torch.float32, "unnamed"),
                                            (torch.float32, "pytorch_optimizer"), (torch.bfloat16, "unnamed"),
                                            (torch.float16, "named")])  # fmt: skip
def test_orthograd_is_the_definition_in_a_training_loop(foreach: Optional[bool], dtype: torch.dtype, how: str) -> None:
    """Each step: ``radial_fraction`` is |radial part| / |g| (``None`` without ``compute_stats``). float32: the
    definition's gradient, orthogonal to ``w``, of norm |g|, and ``pytorch_optimizer.OrthoGrad``'s update. 16-bit: the
    float64 result cast once, within one ulp everywhere and equal almost everywhere (16-bit arithmetic is not)."""
    params, theirs = shaped(dtype), shaped()  # theirs: for pytorch_optimizer's OrthoGrad
    po = pytest.importorskip("pytorch_optimizer") if how == "pytorch_optimizer" else None
    peer = po.OrthoGrad(torch.optim.SGD(dict(theirs).values(), lr=0.05, momentum=0.5)) if po else None
    orthograd = OrthoGrad(params if how != "unnamed" else [p for _, p in params], foreach=foreach)
    opt, total, exact = torch.optim.SGD([p for _, p in params], lr=0.05, momentum=0.5), 0, 0
    for step in range(6):
        fresh_grads(params, 10 + step)
        fresh_grads(theirs, 10 + step)
        ws, raw = {n: p.detach().double() for n, p in params}, snapshot(params)
        stats = orthograd.step(compute_stats=step < 5)
        radial = {n: (ws[n] * g.double()).sum() / ws[n].norm() for n, g in raw.items()}
        assert stats.applied and stats.num_tensors == len(SHAPES)
        fraction = pytest.approx(h.norm(radial) / h.norm(raw), rel=1e-5) if step < 5 else None
        assert stats.radial_fraction == fraction and (step == 5 or 0 < stats.radial_fraction < 1)
        for name, p in params:
            w, a, b = ws[name].flatten(), p.grad.double().flatten(), naive_orthograd(ws[name], raw[name]).flatten()
            assert p.grad.dtype == dtype, name
            if dtype in HALF:  # ``off``: the error in units of the last place of the once-rounded result
                b, finfo = b.to(dtype).double(), torch.finfo(dtype)
                off = (a - b).abs() / (finfo.eps * torch.maximum(a.abs(), b.abs())).clamp_min(finfo.tiny)
                assert float(off.max()) <= 1.0, f"step {step} {name}: {float(off.max())} ulps"
                total, exact = total + off.numel(), exact + int((off == 0).sum())
            else:
                assert h.max_rel_diff([{name: a}], [{name: b}]) < 1e-5, f"step {step} {name}"
                assert abs(float(w @ a) / float(w.norm() * a.norm())) < 1e-6, f"step {step} {name}: not orthogonal"
                assert float(a.norm()) == pytest.approx(h.norm({name: raw[name]}), rel=1e-6)
        opt.step()
        if peer:
            peer.step()
            assert_state_equal(dict(params), dict(theirs), 1e-5, 1e-6, f"step {step}")
    assert exact >= 0.98 * total, f"only {exact}/{total} values equal the once-rounded result"
    assert not torch.equal(params[0][1], shaped(dtype)[0][1])  # it trained


@pytest.mark.parametrize("fused", [None, False, True], ids=["foreach", "loop", "fused"])
def test_a_radial_gradient_of_a_large_tensor_becomes_zero(fused: Optional[bool]) -> None:
    """16M float32 values, and float64 ones that are float32 numbers (a ``model.double()``): the rounding of
    ``<w, g>`` grows with the size, and once left a radial remainder that rescaling turned into ``-g``."""
    for shape, dtype in (((4000, 4000), torch.float32), ((1000, 1000), torch.float64)):
        p = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype))
        p.grad = 0.3 * p.detach()
        OrthoGrad([p], foreach=False if fused is False else None, fused=fused or None).step()
        assert not p.grad.any(), (shape, dtype)


@FOREACH
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [0.3, -2.7, 1e-3, 123.0, 0.5])
def test_orthograd_edge_rules(foreach: Optional[bool], dtype: torch.dtype, c: float) -> None:
    """``g = c * w`` rounded to the dtype (16 bits: a residue ~1e-3 of |g|) has no orthogonal direction: exactly 0,
    the residue not rescaled to |g|, also in a 1000 x 1000 tensor. Then, beside a gradient 5% orthogonal (the
    definition's): a zero weight keeps its gradient, as does a gradient orthogonal to its weight; a 0-d or
    one-element parameter has no orthogonal direction (0), unless ``apply_to="matrices"`` (2+ dimensions) leaves it."""
    gen = torch.Generator().manual_seed(1)
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in [*SHAPES.values(), (1000, 1000)]]
    for p in params:
        p.grad = (c * p.detach().double()).to(dtype)
    fraction = OrthoGrad(params, foreach=foreach).step(compute_stats=True).radial_fraction
    assert fraction <= 1 and fraction == pytest.approx(1, rel=1e-4)
    for p in params:
        assert torch.equal(p.grad, torch.zeros_like(p)), f"shape {tuple(p.shape)}: max {p.grad.abs().max()}"
    w, other = params[0].detach().double(), torch.randn(params[0].shape, generator=gen).double()
    other -= (other * w).sum() / w.square().sum() * w
    edges = {"zero": torch.zeros(2, 3, 2, 2), "s": torch.tensor(0.7), "one": torch.tensor([-1.3]), "⊥": torch.eye(2)}
    group = {"5%": params[0], **{n: nn.Parameter(t.to(dtype)) for n, t in edges.items()}}
    raw = {n: torch.randn(p.shape, generator=gen).to(dtype) for n, p in group.items()}
    raw["5%"] = (w + 0.05 * other * w.norm() / other.norm()).to(dtype)
    raw["⊥"] = torch.tensor([[0.0, 3.0], [4.0, 0.0]], dtype=dtype)  # orthogonal to eye(2), of norm 5
    expected = naive_orthograd(params[0], raw["5%"])
    for apply_to, selected in (("all", set(group)), ("matrices", {"5%", "zero", "⊥"})):
        for n, p in group.items():
            p.grad = raw[n].clone()
        assert OrthoGrad(group.items(), apply_to=apply_to, foreach=foreach).step().num_tensors == len(selected)
        assert h.max_rel_diff([{"5%": group["5%"].grad}], [{"5%": expected}]) < (5e-2 if dtype in HALF else 1e-5)
        for n in ("zero", "s", "one", "⊥"):  # a zero weight, one not selected, a gradient orthogonal to it: as it was
            kept = n in ("zero", "⊥") or n not in selected  # else (0-d, one element): 0
            assert torch.equal(group[n].grad, raw[n] if kept else torch.zeros_like(raw[n])), (apply_to, n)


# ---------------------------------------------------------------------------------------------- 4. nothing to transform
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_gradient_skips_the_step_with_one_warning(kind: str, bad: float) -> None:
    """State and every gradient stay bit for bit; the first skip warns naming the parameter, later ones are counted;
    the next finite step is transformed, silently. Without ``skip_nonfinite`` the bad value goes through."""
    params = shaped()[:2]
    f, v = KINDS[kind](params, **ARGS[kind]), params[1][1]
    fresh_grads(params, 1)
    f.step()
    fresh_grads(params, 2)
    v.grad[1] = bad
    state, before = copy.deepcopy(f.state_dict()["state"]), snapshot(params)
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
    (_, a), (_, b), (_, c) = params = [(n, p) for n, (_, p) in zip("abc", shaped())]
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
    assert_state_equal((b.grad, f.state.get("b")), (got[0]["b"], b_state))  # no state for the stateless ⊥Grad
    if kind == "orthograd":
        assert h.max_rel_diff(got[1:], [{"a": naive_orthograd(a, raw[1]["a"])}]) < 1e-5
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
    (_, p), g = shaped()[0], torch.randn(6, 5, generator=torch.Generator().manual_seed(5)) * 1e20
    p.grad = g.clone()
    assert bool(torch.isfinite(g).all()) and not math.isfinite(float(g.norm()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = (OrthoGrad([p]) if kind == "orthograd" else EMAFilter([p], 0.9, 1.0)).step(compute_stats=True)
    if stats.skipped_nonfinite:
        assert [w for w in caught if issubclass(w.category, RuntimeWarning)] and torch.equal(p.grad, g)
    else:
        expected = naive_orthograd(p, g) if kind == "orthograd" else g.double() * 2
        assert bool(torch.isfinite(p.grad).all()) and h.max_rel_diff([{"p": p.grad}], [{"p": expected}]) < 1e-5


# ---------------------------------------------------------------------------------------------- 5. state
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_state_size_and_dtype_and_a_state_that_cannot_fit(kind: str, dtype: torch.dtype, monkeypatch: Any) -> None:
    """``expected_state_bytes``, known up front, is one copy (EMA) or window_size + 1 (MA) of the parameters, float32
    for 16-bit ones unless ``fp32_state=False``; ``state_bytes`` counts those that had a gradient. One byte short, the
    first step is refused before anything changes, naming the size, its rule and what to change; not at just enough."""
    params = [(n, nn.Parameter(p.detach().to(dtype))) for n, p in make_params() if n not in ("d", "frozen")]
    rule = "one copy" if kind == "ema" else "window_size + 1 = 6 copies"
    tip = "Use the EMA filter (one copy) or a smaller `window_size`. Keep" if kind == "ma" else "Keep 16-bit state"
    for fp32_state in (True, False):
        state_dtype = torch.float32 if fp32_state and dtype in HALF else dtype
        f = KINDS[kind](params, fp32_state=fp32_state, **({} if kind == "ema" else {"window_size": 5}))
        size = {n: (1 if kind == "ema" else 6) * state_dtype.itemsize * p.numel() for n, p in params}
        need, raw = sum(size.values()), random_grads(params, steps=5)  # ``late`` from step 3: all by the last
        assert f.expected_state_bytes() == need and f.state_bytes() == 0
        monkeypatch.setattr("lightning_grokfast.transform.available_memory", lambda device, free=need - 1: free)
        with pytest.raises(MemoryError) as err:
            drive(f, params, raw[:1])
        b = [f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" for n in (need, need - 1)]
        assert f"needs {b[0]} ({rule} of 34 parameter values), but only {b[1]} is free on cpu. {tip}" in str(err.value)
        assert_state_equal((f.state, snapshot(params)), ({}, raw[0]))
        monkeypatch.setattr("lightning_grokfast.transform.available_memory", lambda device, free=need: free)
        for k, grads in enumerate(raw):
            assert all(g is None or g.dtype == dtype for g in drive(f, params, [grads])[0].values())
            assert f.state_bytes() == sum(size[n] for n in size if n != "late" or k >= 3), k
        assert {t.dtype for e in f.state.values() for t in e.values() if isinstance(t, Tensor)} == {state_dtype}


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


@pytest.mark.parametrize(("kind", "copies"), [("ema", 1), ("ma", 10 + 1)])
def test_state_is_updated_in_place_and_memory_is_flat_over_thousands_of_steps(kind: str, copies: int) -> None:
    """3000 steps: the same state tensors, of constant size, no autograd graph kept, flat process RSS (a leak of one
    gradient-sized copy per step would add 2500 * 16 KiB, about 40 MiB)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    opt, x, y = torch.optim.SGD(model.parameters(), lr=1e-3), torch.randn(16, 32), torch.randn(16, 32)
    filt = KINDS[kind](model.named_parameters(), **({"window_size": 10} if kind == "ma" else {}))
    rss, pointers, numel = [], [], sum(p.numel() for p in model.parameters())
    for step in range(1, 3001):
        opt.zero_grad()
        nn.functional.mse_loss(model(x + 0.01 * step), y).backward()
        filt.step()
        opt.step()
        assert filt.state_bytes() == copies * 4 * numel, step
        if step == 1 or step % 250 == 0:
            tensors = h.state_tensors(filt)  # all of them, however held
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
    p, gen = nn.Parameter(torch.zeros(64)), torch.Generator().manual_seed(0)
    f = MAFilter([p], window_size=5, lamb=1.0, foreach=foreach)
    for step in range(1, 2001):
        p.grad = torch.randn(64, generator=gen) * 100 + 1e4  # a large mean makes float32 drift visible quickly
        f.step()
        ring, total = f.state["0"]["window"], f.state["0"]["sum"]
        assert h.max_rel_diff([{"sum": total}], [{"sum": ring.double().sum(0)}]) < 1e-6, step
        assert step % 5 or torch.equal(total, ring.sum(0)), step


@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_loading_a_state(kind: str) -> None:
    """Saved from a ``torch.compile``d module, keyed by plain names, it loads into the plain and the compiled module.
    With inf or NaN it is refused naming the parameter, loading nothing. The first step warns naming a parameter
    with a gradient but no entry (it starts fresh), not one without a gradient (frozen until now)."""
    model, make = mlp(compiled=True), functools.partial(KINDS[kind], **ARGS[kind])
    assert any("_orig_mod." in n for n, _ in model.named_parameters())
    f = make(model.named_parameters())
    for seed in range(2):
        model.zero_grad()
        loss(model, seed).backward()
        f.step()
    saved = f.state_dict()
    assert set(saved["state"]) == {n for n, _ in mlp().named_parameters()}
    for compiled in (False, True):
        (target := make(mlp(compiled=compiled).named_parameters())).load_state_dict(saved)
        assert_state_equal(target.state, saved["state"])
    for bad in (math.nan, math.inf):
        poisoned = copy.deepcopy(saved)
        poisoned["state"]["2.weight"]["mu" if kind == "ema" else "window"].view(-1)[1] = bad
        with pytest.raises(ValueError, match=r"The state of '2\.weight' holds inf or NaN"):
            (target := make(model.named_parameters())).load_state_dict(poisoned)
        assert not target.state
    partial = {**saved, "state": {n: e for n, e in saved["state"].items() if n != "2.bias"}}
    for state, bias_grad, warns in ((saved, True, 0), (partial, False, 0), (partial, True, 1)):
        (target := make(model.named_parameters())).load_state_dict(state)
        model.zero_grad()
        loss(model, 2).backward()
        model[2].bias.grad = model[2].bias.grad if bias_grad else None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            target.step()
        fresh = r"no entry for '2\.bias', which have a gradient now; their state starts fresh"
        assert len(caught) == warns and all(re.search(fresh, str(w.message)) for w in caught)


# ---------------------------------------------------------------------------------------------- 6. GradScaler, Fabric
def scaled_run(order: str, steps: int, fabric: bool = False) -> tuple[EMAFilter, nn.Module]:
    """EMA + SGD with a CPU GradScaler (scale 1024): "scaler" passes it to ``step`` (with ``fabric`` only Fabric's
    optimizer), "manual" unscales first, "both" unscales first and passes it too."""
    scaler, model = torch.amp.GradScaler("cpu", init_scale=2.0**10), mlp()
    opt = inner = torch.optim.SGD(model.parameters(), lr=0.1)
    if fabric:  # "16-mixed" on CPU: fabric.backward leaves gradients scaled by its precision's scaler
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


@pytest.mark.parametrize("fabric", [False, True], ids=["scaler", "fabric"])
def test_step_with_a_scaler_unscales_first_and_equals_the_manual_order(fabric: bool) -> None:
    """The weights and state (``mu``: of unscaled gradients) of ``unscale_`` then ``step()``, also after ``unscale_``
    (not unscaled twice); Fabric's optimizer brings the scaler of its precision ("16-mixed", CPU). Refused: a scaler
    without its optimizer; a step after ``scaler.step``."""
    manual_f, manual_model = scaled_run("manual", 3, fabric)
    assert not torch.equal(manual_model[0].weight, mlp()[0].weight)  # the optimizer stepped
    for order in ("scaler", "both"):
        f, model = scaled_run(order, 3, fabric)
        assert_state_equal((model.state_dict(), f.state_dict()), (manual_model.state_dict(), manual_f.state_dict()))
    scaler, opt = torch.amp.GradScaler("cpu"), torch.optim.SGD((model := mlp()).parameters(), lr=0.1)
    scaler.scale(loss(model, 0)).backward()
    with pytest.raises(ValueError, match="`scaler` needs `optimizer`"):
        EMAFilter(model.parameters()).step(scaler=scaler)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match=r"after `scaler\.step\(optimizer\)`"):
        EMAFilter(model.parameters()).step(scaler=scaler, optimizer=opt)


def test_the_wrong_order_filters_scaled_gradients_wrongly_from_the_first_change_of_scale() -> None:
    """``scaler.scale(loss).backward(); step(); scaler.unscale_(optimizer)``, the README's wrong order: the EMA of
    scaled gradients is the algorithm's only while the scale stays; with ``growth_interval=1`` it doubles every step
    and the filtered gradients leave the algorithm at once. ⊥Grad, invariant to a scale, stays right."""
    errors: dict[str, list[float]] = {"ema": [], "orthograd": []}
    for kind in errors:
        params, ema = dict(enumerate((model := mlp()).parameters())), h.NaiveEMA(0.9, 2.0)
        opt, scaler = torch.optim.SGD(model.parameters(), lr=0.1), torch.amp.GradScaler("cpu", growth_interval=1)
        f = EMAFilter(model.parameters(), 0.9, 2.0) if kind == "ema" else OrthoGrad(model.parameters())
        for step in range(5):
            opt.zero_grad()
            scaler.scale(loss(model, step)).backward()
            raw = {i: p.grad / scaler.get_scale() for i, p in params.items()}
            expected = ema.step(raw) if kind == "ema" else {i: naive_orthograd(p, raw[i]) for i, p in params.items()}
            f.step()
            scaler.unscale_(opt)  # too late
            errors[kind].append(h.max_rel_diff([snapshot(params.items())], [expected]))
            scaler.step(opt)
            scaler.update()
    assert errors["ema"][0] < 1e-6 and min(errors["ema"][1:]) > 0.3, errors  # README: 0.64, 1.05, 0.90, 0.91
    assert max(errors["orthograd"]) < 1e-5


# ---------------------------------------------------------------------------------------------- 7. statistics
def assert_stats(stats: Any, raw: Grads, grads: Grads) -> None:
    """A filter step's statistics are the norms and cosine of the real tensors: raw, filtered and added."""
    added = {n: g.double() - raw[n].double() for n, g in h.present(grads).items()}
    dot = sum(float((raw[n].double() * s).sum()) for n, s in added.items())
    r, f, s = h.norm(h.present(raw)), h.norm(h.present(grads)), h.norm(added)
    norms = (stats.raw_norm, stats.filtered_norm, stats.slow_norm, stats.amplification)
    assert norms == pytest.approx((r, f, s, f / r), 1e-5)
    assert -1 <= stats.cosine <= 1 and stats.cosine == pytest.approx(dot / (r * s), 1e-5, 1e-6)


@FOREACH
@pytest.mark.parametrize("case", ["ema", "ma", "g, -g"])
def test_filter_statistics_are_the_norms_of_the_real_tensors(case: str, foreach: Optional[bool]) -> None:
    """Computed from |g|^2 + 2<g, s> + |s|^2, they are those of the real tensors; cosine 1 at the first step (the
    slow part is g), amplification below 1 once the slow part opposes g (sign flip at step 5). "g, -g" (EMA,
    alpha 0.9, lamb 2): mu = g, amplification 3; then g_hat = -g + 2 * 0.8 g: amplification 0.6, cosine -1 (>= -1)."""
    settings = {"ema": {"alpha": 0.7, "lamb": 3.0}, "ma": {"window_size": 3, "lamb": 4.0, "warmup": False}}
    kind, flip, args = (case, 5, settings[case]) if case in settings else ("ema", 1, {"alpha": 0.9, "lamb": 2.0})
    for seed in range(10):
        model = mlp(seed=seed)
        f, history = KINDS[kind](model.named_parameters(), foreach=foreach, **args), []
        for step in range(8 if case != "g, -g" else 2):
            model.zero_grad()
            loss(model, 10 * seed + (step if step < 3 and flip == 5 else 0), 1.0 if step < flip else -1.0).backward()
            raw = snapshot(model.named_parameters())
            history.append(f.step(compute_stats=True))
            assert_stats(history[-1], raw, snapshot(model.named_parameters()))
        assert history[0].cosine == pytest.approx(1.0) and history[0].amplification > 1
        assert min(s.amplification for s in history[flip:]) < 1 and min(s.cosine for s in history[flip:]) < 0
        if case == "g, -g":
            assert [s.amplification for s in history] == pytest.approx([3.0, 0.6], rel=1e-5)
            assert [s.cosine for s in history] == pytest.approx([1.0, -1.0])
            assert_state_equal(snapshot(model.named_parameters()), {n: -0.6 * g for n, g in raw.items()}, 1.3e-6, 1e-5)

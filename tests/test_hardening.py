"""The "Hardening" issue, one group of tests per item; each fails on the code before the fix.

1. Stacked GrokfastCallbacks are refused (another kind in ``setup``, the same kind by Lightning); a Grokfast and a
   ⊥Grad callback together are fine.
2. 16-bit gradients keep their filter state in float32 (``fp32_state``): a bfloat16 EMA no longer freezes, and
   under ``bf16-true`` / ``16-true`` both filters are the exact result rounded once.
3. A state that cannot fit in memory is refused before it is allocated; its size is logged; the expected size is
   the real one.
4. ``step(scaler=..., optimizer=...)`` unscales a GradScaler's gradients first, exactly once.
5. State saved from a ``torch.compile``d module loads into the plain one and back.
6. numpy scalars are accepted as numbers (stored as Python ones); booleans are not.
7. Loaded state holding inf or NaN is refused.
8. ``amplification`` falls below 1 when the slow component opposes the gradient; ``filtered_norm`` is the real one.

Names that appeared only with the fix are imported inside the tests that need them, so that each test (not the
whole module) fails on the code before it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import GradRecorder, TinyModel, magnitudes, make_trainer, reference, replay
from torch import Tensor, nn

from lightning_grokfast import EMAFilter, GrokfastCallback, MAFilter

MA_ARGS = {"window_size": 20, "lamb": 5.0, "warmup": True, "reduction": "mean"}
EMA_ARGS = {"alpha": 0.98, "lamb": 2.0}


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _backward(model: nn.Module, seed: int, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x, y = torch.randn(16, 4, generator=gen).to(dtype), torch.randn(16, 3, generator=gen).to(dtype)
    (scale * nn.functional.mse_loss(model(x), y)).backward()


# ---------------------------------------------------------------------------------------------- 1. stacking


def test_ema_and_ma_callbacks_together_are_refused_at_fit_naming_both_and_the_cli() -> None:
    ema, ma = GrokfastCallback(), GrokfastCallback(filter="ma", window_size=7)
    trainer = make_trainer(callbacks=[ema, ma], max_steps=2)  # different state keys: Lightning accepts them
    model = TinyModel()
    before = _weights(model)
    with pytest.raises(ValueError) as err:
        trainer.fit(model)
    message = str(err.value)
    assert "GrokfastCallback(filter='ema', alpha=0.98, lamb=2.0)" in message
    assert "GrokfastCallback(filter='ma', window_size=7, lamb=5.0, warmup=True, reduction='mean')" in message
    assert "LightningCLI" in message and "callbacks+=" in message
    assert trainer.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_two_callbacks_of_the_same_filter_are_refused_by_lightning() -> None:
    with pytest.raises(RuntimeError, match="more than one stateful callback"):
        make_trainer(callbacks=[GrokfastCallback(alpha=0.9), GrokfastCallback(alpha=0.8, lamb=1.0)])


def test_grokfast_and_orthograd_callbacks_together_are_accepted() -> None:
    from lightning_grokfast import OrthoGradCallback

    grokfast, orthograd = GrokfastCallback(), OrthoGradCallback()
    trainer = make_trainer(callbacks=[grokfast, orthograd], max_steps=3)
    trainer.fit(TinyModel())
    assert trainer.global_step == 3
    assert grokfast.grad_filter is not None and grokfast.grad_filter.state
    assert orthograd.transform is not None


# ---------------------------------------------------------------------------------------------- 2. 16-bit state


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_ema_state_of_16bit_gradients_is_float32_by_default(dtype: torch.dtype) -> None:
    p = nn.Parameter(torch.zeros(3, 2, dtype=dtype))
    default, narrow = EMAFilter([p], alpha=0.9, lamb=1.0), EMAFilter([p], alpha=0.9, lamb=1.0, fp32_state=False)
    for f in (default, narrow):
        p.grad = torch.full((3, 2), 0.3, dtype=dtype)
        f.step()
        assert p.grad.dtype == dtype
    assert default.state["0"]["mu"].dtype == torch.float32
    assert narrow.state["0"]["mu"].dtype == dtype
    q = nn.Parameter(torch.zeros(3, dtype=dtype))
    ma = MAFilter([q], window_size=2, lamb=1.0)
    q.grad = torch.ones(3, dtype=dtype)
    ma.step()
    assert ma.state["0"]["window"].dtype == ma.state["0"]["sum"].dtype == torch.float32 and q.grad.dtype == dtype


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
def test_bfloat16_ema_keeps_moving_with_float32_state(foreach: bool) -> None:
    """First g = 1.0, then 200 steps of g = bf16(1.1) with alpha 0.98 (lamb 0): mu climbs to ~1.0998. In bfloat16
    each update (0.02 * 0.1 = 0.002) is below half an ulp of 1.0 (0.0039) and mu never leaves 1.0."""
    alpha, steps = 0.98, 200
    p = nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    wide = EMAFilter([p], alpha=alpha, lamb=0.0, foreach=foreach)
    narrow = EMAFilter([p], alpha=alpha, lamb=0.0, fp32_state=False, foreach=foreach)
    g1 = torch.full((4,), 1.1, dtype=torch.bfloat16)
    for f in (wide, narrow):
        p.grad = torch.ones(4, dtype=torch.bfloat16)
        f.step()
        for _ in range(steps):
            p.grad = g1.clone()
            f.step()
            assert p.grad.dtype == torch.bfloat16 and torch.equal(p.grad, g1)  # lamb 0: unchanged
    expected = float(g1[0]) + (1.0 - float(g1[0])) * alpha**steps  # 1.0998
    mu = wide.state["0"]["mu"]
    assert mu.dtype == torch.float32
    assert torch.allclose(mu.double(), torch.full((4,), expected, dtype=torch.float64), rtol=0, atol=1e-5)
    assert abs(expected - 1.098) < 0.005
    assert torch.equal(narrow.state["0"]["mu"], torch.ones(4, dtype=torch.bfloat16))


def _replay_plain(kind: str, raw: list[dict[str, Any]], fp32_state: bool, **kwargs: Any) -> list[dict[str, Tensor]]:
    """The plain filter on a recorded raw-gradient sequence (16-bit), returning the filtered gradients."""
    params = {n: nn.Parameter(torch.zeros_like(g)) for n, g in raw[0].items() if g is not None}
    cls, names = (EMAFilter, ("alpha", "lamb")) if kind == "ema" else (MAFilter, tuple(MA_ARGS))
    transform = cls(params.items(), **{k: v for k, v in kwargs.items() if k in names}, fp32_state=fp32_state)
    out = []
    for step in raw:
        for name, p in params.items():
            p.grad = None if step[name] is None else step[name].clone()
        transform.step()
        out.append({n: p.grad.clone() for n, p in params.items() if p.grad is not None})
    return out


def _worst_error(filtered: list[dict[str, Any]], raw: list[dict[str, Any]], kind: str, **kwargs: Any) -> float:
    """Largest ``max|a - ref| / max(|g| + lamb * slow(|g|))`` per tensor and step against the float64 reference."""
    expected, scale = replay(reference(kind, **kwargs), raw), magnitudes(kind, raw, **kwargs)
    worst = 0.0
    for act, exp, mag in zip(filtered, expected, scale):
        for name, b in exp.items():
            if b is not None:
                err = (act[name].double() - b).abs().max().item() / max(mag[name].abs().max().item(), 1e-30)
                worst = max(worst, err)
    return worst


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_16bit_training_matches_the_float64_reference_rounded_once(precision: str, kind: str) -> None:
    """200 steps under ``bf16-true`` / ``16-true`` (a ``.half()`` model): against the naive float64 algorithm on the
    same 16-bit raw gradients, the filtered gradient is off by no more than its one final rounding (half an ulp,
    relative to the operands). The same raw gradients through a 16-bit state (``fp32_state=False``) fail that."""
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float16
    args = EMA_ARGS if kind == "ema" else MA_ARGS
    raw, filtered = GradRecorder(), GradRecorder()
    trainer = make_trainer(
        callbacks=[raw, GrokfastCallback(filter=kind, **args), filtered], max_steps=200, precision=precision
    )
    trainer.fit(TinyModel(lr=0.001))
    grads = [g for g in raw.steps[-1].values() if g is not None]
    assert grads and all(g.dtype == dtype for g in grads)
    assert all(g.dtype == dtype for s in filtered.steps for g in s.values() if g is not None)
    assert all(math.isfinite(g.abs().max().item()) for s in raw.steps for g in s.values() if g is not None)
    tolerance = 0.5 * torch.finfo(dtype).eps * 1.02  # one rounding to the gradient's dtype, plus float32 slack
    assert _worst_error(filtered.steps, raw.steps, kind, **args) <= tolerance
    narrow = _replay_plain(kind, raw.steps, False, **args)
    assert _worst_error(narrow, raw.steps, kind, **args) > 2 * tolerance


# ---------------------------------------------------------------------------------------------- 3. memory


def _fmt_kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def test_ma_callback_refuses_a_state_that_cannot_fit_in_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_grokfast._base as base

    monkeypatch.setattr(base, "available_memory", lambda device: 10_000)
    model = TinyModel(hidden=300)
    numel = sum(p.numel() for p in model.parameters())
    assert numel > 1000
    grokfast = GrokfastCallback(filter="ma", window_size=100)
    trainer = make_trainer(callbacks=[grokfast], max_steps=2)
    before = _weights(model)
    with pytest.raises(MemoryError) as err:
        trainer.fit(model)
    message = str(err.value)
    assert _fmt_kib(101 * numel * 4) in message  # window + 1 copies of float32
    assert f"{numel:,}" in message and "window_size" in message and "100" in message
    assert "EMA" in message and "smaller `window_size`" in message
    assert trainer.global_step == 0 and all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert grokfast.grad_filter is None or not grokfast.grad_filter.state  # nothing allocated


def test_plain_ma_filter_refuses_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused at the latest on the first ``step``, before the first window is allocated."""
    import lightning_grokfast._base as base

    monkeypatch.setattr(base, "available_memory", lambda device: 10_000)
    model = _mlp()
    _backward(model, 0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    numel = sum(p.numel() for p in model.parameters())
    created: list[MAFilter] = []
    with pytest.raises(MemoryError) as err:
        created.append(MAFilter(model.named_parameters(), window_size=100))
        created[0].step()
    assert _fmt_kib(101 * numel * 4) in str(err.value) and f"{numel:,}" in str(err.value)
    assert not created or not created[0].state
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    monkeypatch.setattr(base, "available_memory", lambda device: 10**12)
    MAFilter(model.named_parameters(), window_size=100).step()  # enough memory: accepted


@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_state_size_is_logged_once_at_setup(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    model = TinyModel(hidden=300)
    numel = sum(p.numel() for p in model.parameters())
    copies = 1 if kind == "ema" else 8
    grokfast = GrokfastCallback(filter=kind, window_size=7)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        make_trainer(callbacks=[grokfast], max_steps=3).fit(model)
    lines = [r.getMessage() for r in caplog.records if "state will hold" in r.getMessage()]
    assert len(lines) == 1, lines
    assert _fmt_kib(copies * numel * 4) in lines[0] and f"{numel:,}" in lines[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_expected_state_bytes_is_the_real_state_size(dtype: torch.dtype, kind: str) -> None:
    model = _mlp(dtype)
    param_bytes = sum(p.numel() * (4 if dtype in (torch.bfloat16, torch.float16) else p.element_size())
                      for p in model.parameters())  # fmt: skip
    f = EMAFilter(model.named_parameters()) if kind == "ema" else MAFilter(model.named_parameters(), window_size=5)
    expected = param_bytes * (1 if kind == "ema" else 6)
    assert f.expected_state_bytes() == expected
    assert f.state_bytes() == 0
    model[2].weight.requires_grad_(False)  # one parameter without gradient yet: not all of the state exists
    _backward(model, 0)
    f.step()
    assert 0 < f.state_bytes() < expected
    model[2].weight.requires_grad_(True)
    _backward(model, 1)
    f.step()
    assert f.state_bytes() == f.expected_state_bytes() == expected


# ---------------------------------------------------------------------------------------------- 4. GradScaler


def _scaled_run(order: str, steps: int = 4) -> tuple[EMAFilter, nn.Module, list[Tensor]]:
    """EMA + SGD with a CPU GradScaler; ``order``: "scaler" passes it to ``step``, "manual" unscales first,
    "both" unscales first and passes it too. Returns the filter, the model and the first raw (unscaled) gradient."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    assert scaler.is_enabled()
    f = EMAFilter(model.named_parameters(), alpha=0.9, lamb=2.0)
    first: list[Tensor] = []
    for step in range(steps):
        opt.zero_grad()
        if step == 0:
            _backward(model, step)
            first = [p.grad.clone() for p in model.parameters()]
            opt.zero_grad()
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 3, generator=gen)
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        if order in ("manual", "both"):
            scaler.unscale_(opt)
        if order == "manual":
            f.step()
        else:
            f.step(scaler=scaler, optimizer=opt)
        scaler.step(opt)
        scaler.update()
    return f, model, first


def test_step_with_a_scaler_unscales_first_and_equals_the_manual_order() -> None:
    manual_f, manual_m, raw = _scaled_run("manual")
    for order in ("scaler", "both"):  # "both": after unscale_ it must not unscale a second time
        f, m, _ = _scaled_run(order)
        for name, p in m.named_parameters():
            assert torch.equal(p, manual_m.get_parameter(name)), f"{order}: {name}"
            assert torch.equal(f.state[name]["mu"], manual_f.state[name]["mu"]), f"{order}: {name}"
    # the state is built from unscaled gradients: after one step mu is the raw gradient, not 1024 times it
    f, _, raw = _scaled_run("scaler", steps=1)
    for (name, _), g in zip(_mlp().named_parameters(), raw):
        torch.testing.assert_close(f.state[name]["mu"], g, rtol=1e-5, atol=1e-7)
    mu_mean = np.mean([f.state[n]["mu"].abs().mean().item() for n in f.state])
    assert mu_mean == pytest.approx(np.mean([g.abs().mean().item() for g in raw]), rel=1e-4)


def test_scaler_without_optimizer_is_refused() -> None:
    model = _mlp()
    _backward(model, 0)
    with pytest.raises(ValueError, match="optimizer"):
        EMAFilter(model.parameters()).step(scaler=torch.amp.GradScaler("cpu"))


# ---------------------------------------------------------------------------------------------- 5. torch.compile

COMPILE_BACKEND = "aot_eager"  # dynamo + AOTAutograd; inductor's first C++ build takes ~40 s on these machines


class Wrapped(nn.Module):
    def __init__(self, compiled: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        self.head = nn.Linear(3, 3)
        if compiled:
            self.inner = torch.compile(self.inner, backend=COMPILE_BACKEND)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.inner(x))


@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_state_of_a_compiled_module_loads_into_the_plain_one_and_back(kind: str) -> None:
    def make(model: nn.Module) -> Any:
        if kind == "ema":
            return EMAFilter(model.named_parameters(), alpha=0.9, lamb=1.0)
        return MAFilter(model.named_parameters(), window_size=3, lamb=1.0)

    compiled, plain = Wrapped(True), Wrapped(False)
    assert any("_orig_mod." in n for n, _ in compiled.named_parameters())
    runs = []
    for model in (compiled, plain):
        f = make(model)
        for step in range(2):
            model.zero_grad()
            _backward(model, step)
            f.step()
        runs.append(f)
    saved_compiled, saved_plain = (f.state_dict() for f in runs)
    assert set(saved_compiled["state"]) == set(saved_plain["state"]) == {n for n, _ in plain.named_parameters()}
    for target, source in ((make(Wrapped(False)), saved_compiled), (make(Wrapped(True)), saved_plain)):
        target.load_state_dict(source)
        assert set(target.state) == set(source["state"])
        for name, entry in source["state"].items():
            for key, value in entry.items():
                got = target.state[name][key]
                assert torch.equal(got, value) if isinstance(value, Tensor) else got == value


class CompiledTiny(TinyModel):
    """The scaffold's model with its first layer compiled."""

    def __init__(self) -> None:
        super().__init__()
        self.net[0] = torch.compile(self.net[0], backend=COMPILE_BACKEND)


def test_fit_with_a_compiled_inner_module_filters() -> None:
    grokfast = GrokfastCallback(alpha=0.8, lamb=2.0)
    raw, filtered = GradRecorder(), GradRecorder()
    model = CompiledTiny()
    make_trainer(callbacks=[raw, grokfast, filtered], max_steps=4).fit(model)
    assert any("_orig_mod." in n for n, _ in model.named_parameters())
    ref = replay(reference("ema", alpha=0.8, lamb=2.0), raw.steps)
    for act, exp in zip(filtered.steps, ref):
        for name, b in exp.items():
            if b is not None:
                torch.testing.assert_close(act[name].double(), b, rtol=1e-5, atol=1e-7)
    assert grokfast.grad_filter is not None
    names = set(grokfast.grad_filter.state_dict()["state"])
    assert "net.0.weight" in names and not any("_orig_mod" in n for n in names)


# ---------------------------------------------------------------------------------------------- 6. numpy scalars


@pytest.mark.parametrize("name", ["alpha", "lamb", "window_size"])
def test_numpy_scalars_are_accepted_as_python_numbers_and_booleans_refused(name: str, tmp_path: Path) -> None:
    """A sweep's numpy values are numbers (stored as Python ones, so that the state loads with weights_only=True);
    ``True`` and ``np.bool_(True)`` are not, though ``True`` passes an ``int`` check: refused naming the argument."""
    kind = int if name == "window_size" else float
    value = {"alpha": np.float32(0.9), "lamb": np.float32(1.5), "window_size": np.int64(10)}[name]
    cb = GrokfastCallback(**{name: value})
    assert type(getattr(cb, name)) is kind and getattr(cb, name) == pytest.approx(float(value))
    p = nn.Parameter(torch.ones(3))
    f = MAFilter([p], window_size=value) if name == "window_size" else EMAFilter([p], **{name: value})
    assert type(getattr(f, name)) is kind
    p.grad = torch.ones(3)
    f.step()
    assert all(type(v) in (int, float, bool, str) for v in f.state_dict()["hparams"].values())
    torch.save(f.state_dict(), tmp_path / "state.pt")
    f.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for bad in (True, np.bool_(True)):
        with pytest.raises(ValueError, match=f"`{name}`"):
            GrokfastCallback(**{name: bad})
        with pytest.raises(ValueError, match=f"`{name}`"):
            MAFilter([p], window_size=bad) if name == "window_size" else EMAFilter([p], **{name: bad})


def test_numpy_arguments_together() -> None:
    cb = GrokfastCallback(alpha=np.float32(0.9), lamb=np.float64(1.0), window_size=np.int64(10))
    assert (type(cb.alpha), type(cb.lamb), type(cb.window_size)) == (float, float, int)
    assert cb.config() == {"filter": "ema", "alpha": float(np.float32(0.9)), "lamb": 1.0}
    ma = GrokfastCallback(filter="ma", lamb=np.float64(1.0), window_size=np.int64(10))
    assert ma.config()["window_size"] == 10 and type(ma.config()["window_size"]) is int


# ---------------------------------------------------------------------------------------------- 7. non-finite state


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_loading_nonfinite_state_is_refused_naming_the_parameter(kind: str, bad: float) -> None:
    model = _mlp()

    def make() -> Any:
        return EMAFilter(model.named_parameters()) if kind == "ema" else MAFilter(model.named_parameters(), 3)

    f = make()
    _backward(model, 0)
    f.step()
    saved = f.state_dict()
    key = "mu" if kind == "ema" else "window"
    poisoned = {**saved, "state": {n: {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in e.items()}
                                   for n, e in saved["state"].items()}}  # fmt: skip
    poisoned["state"]["2.weight"][key].view(-1)[1] = bad
    target = make()
    with pytest.raises(ValueError, match=r"'2\.weight'"):
        target.load_state_dict(poisoned)
    assert not target.state  # nothing loaded
    target.load_state_dict(saved)  # the clean one loads


def test_resume_from_a_checkpoint_with_nan_state_is_refused(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, callbacks=[GrokfastCallback()], max_steps=8)  # one epoch
    trainer.fit(TinyModel())
    path = tmp_path / "good.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    key = GrokfastCallback().state_key
    ckpt["callbacks"][key]["filter"]["state"]["net.0.weight"]["mu"][0, 0] = math.nan
    bad = tmp_path / "nan.ckpt"
    torch.save(ckpt, bad)
    resumed = TinyModel()
    with pytest.raises(ValueError, match=r"'net\.0\.weight'") as err:
        make_trainer(tmp_path, callbacks=[GrokfastCallback()], max_steps=6).fit(
            resumed, ckpt_path=tmp_path / "nan.ckpt"
        )
    assert "inf or NaN" in str(err.value)
    make_trainer(tmp_path, callbacks=[GrokfastCallback()], max_steps=12).fit(TinyModel(), ckpt_path=path)  # clean one


# ---------------------------------------------------------------------------------------------- 8. statistics


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
def test_amplification_below_one_when_the_slow_component_opposes_the_gradient(foreach: bool) -> None:
    """alpha 0.9, lamb 2: g (mu = g: cosine 1, amplification 3), then -g: mu = 0.8 g, g_hat = -g + 1.6 g = 0.6 g,
    so amplification 0.6 and cosine -1. Rounding must not push the cosine out of [-1, 1]."""
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        params = [nn.Parameter(torch.zeros(shape)) for shape in [(8, 4), (8,), (3, 8), (3,)]]
        raw = [torch.randn(p.shape, generator=gen) for p in params]
        f = EMAFilter(params, alpha=0.9, lamb=2.0, foreach=foreach)
        for p, g in zip(params, raw):
            p.grad = g.clone()
        first = f.step(compute_stats=True)
        assert first.amplification == pytest.approx(3.0, rel=1e-6)
        assert -1.0 <= first.cosine <= 1.0 and first.cosine == pytest.approx(1.0), (seed, first.cosine)
        for p, g in zip(params, raw):
            p.grad = -g
        stats = f.step(compute_stats=True)
        assert stats.amplification < 1 and stats.cosine < 0
        assert stats.amplification == pytest.approx(0.6, rel=1e-5)
        assert -1.0 <= stats.cosine <= 1.0 and stats.cosine == pytest.approx(-1.0), (seed, stats.cosine)
        actual = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params))
        assert stats.filtered_norm == pytest.approx(actual, rel=1e-6)
        for p, g in zip(params, raw):
            torch.testing.assert_close(p.grad, 0.6 * g)


@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "loop"])
@pytest.mark.parametrize("kind", ["ema", "ma"])
def test_filtered_norm_is_the_norm_of_the_filtered_gradients(kind: str, foreach: bool) -> None:
    """Over steps of real gradients, with a sign flip that makes the slow part oppose the gradient: the statistics
    (computed from |g|^2 + 2<g, s> + |s|^2) equal the norms of the real tensors, the cosine stays in [-1, 1] (on the
    first step the slow part is parallel to g) and the amplification falls below 1 after the flip."""
    for seed in range(4):
        model = _mlp(seed=seed)
        f = (
            EMAFilter(model.named_parameters(), alpha=0.7, lamb=3.0, foreach=foreach)
            if kind == "ema"
            else MAFilter(model.named_parameters(), window_size=3, lamb=4.0, warmup=False, foreach=foreach)
        )
        cosines, amplifications = [], []
        for step in range(8):
            model.zero_grad()
            # three batches, then one batch repeated, whose gradient flips sign at step 5
            _backward(model, 10 * seed + (step if step < 3 else 0), scale=1.0 if step < 5 else -1.0)
            raw = [p.grad.double().clone() for p in model.parameters()]
            stats = f.step(compute_stats=True)
            grads = [p.grad for p in model.parameters()]
            actual = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
            raw_norm = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in raw])))
            slow = math.sqrt(sum(float((g.double() - r).square().sum()) for g, r in zip(grads, raw)))
            dot = sum(float((r * (g.double() - r)).sum()) for g, r in zip(grads, raw))
            assert stats.filtered_norm == pytest.approx(actual, rel=1e-5), step
            assert stats.raw_norm == pytest.approx(raw_norm, rel=1e-6)
            assert stats.slow_norm == pytest.approx(slow, rel=1e-5)
            assert stats.amplification == pytest.approx(actual / raw_norm, rel=1e-5)
            assert stats.cosine == pytest.approx(dot / (raw_norm * slow), rel=1e-5, abs=1e-6)
            cosines.append(stats.cosine)
            amplifications.append(stats.amplification)
        assert cosines[0] == pytest.approx(1.0) and amplifications[0] > 1  # first step: slow part = g
        assert all(-1.0 <= c <= 1.0 for c in cosines), (seed, cosines)
        assert min(amplifications[5:]) < 1 and min(cosines[5:]) < 0

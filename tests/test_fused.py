"""``fused=True``: each group's update as one kernel built by ``torch.compile`` (inductor, C++ on CPU).

Against the float64 references and the multi-tensor path (float32, and 16-bit gradients with float32 state); built
once and reused (no recompilation as steps go by, as the MA ring turns, nor for another model of the same shapes);
refused clearly where it cannot be built. The rest of the suite's Trainer matrix runs with fused kernels in
``test_the_suite_passes_with_fused_kernels``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_state_equal, naive_orthograd, reference, snapshot
from torch import nn
from torch._dynamo.utils import counters

import lightning_grokfast._fused as fused_module
from lightning_grokfast import EMAFilter, MAFilter, OrthoGrad

KINDS = {"ema": (EMAFilter, {"alpha": 0.9, "lamb": 2.0}), "ma": (MAFilter, {"window_size": 3, "lamb": 2.0})}
KINDS["orthograd"] = (OrthoGrad, {})
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4), nn.Linear(4, 3, bias=False)).to(dtype)


def drive(kind: str, dtype: torch.dtype, steps: int = 8, **options: Any) -> tuple[list[Any], list[Any], list[Any]]:
    """``steps`` steps on fresh random gradients, the last layer joining at step 2 and left out at step 5, statistics
    every other step: the raw gradients, the weights before each step and the transformed gradients."""
    net = model(dtype)
    cls, kwargs = KINDS[kind]
    transform = cls(net.named_parameters(), **kwargs, **options)
    raw, weights, out = [], [], []
    for k in range(steps):
        gen = torch.Generator().manual_seed(k)
        for name, p in net.named_parameters():
            late = name.startswith("3.") and (k < 2 or k == 5)
            p.grad = None if late else torch.randn(p.shape, generator=gen).to(dtype)
        raw.append(snapshot(net.named_parameters()))
        weights.append({n: p.detach().clone() for n, p in net.named_parameters()})
        transform.step(compute_stats=k % 2 == 0)
        out.append(snapshot(net.named_parameters()))
        with torch.no_grad():
            for p in net.parameters():
                p.sub_(0.01 * p.grad if p.grad is not None else 0)
    return raw, weights, out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(KINDS))
def test_fused_results_are_the_algorithm_and_the_multi_tensor_paths_within_rounding(
    kind: str, dtype: torch.dtype
) -> None:
    """Against the float64 reference on the same (16-bit) gradients: at most one rounding to the gradient's dtype
    (float32: 1e-6 of the operands) and, for float32, within rounding of the multi-tensor path."""
    raw, weights, got = drive(kind, dtype, fused=True)
    eps = 1e-6 if dtype == torch.float32 else 0.51 * torch.finfo(dtype).eps
    if kind == "orthograd":
        expected = [{n: None if g is None else naive_orthograd(w[n], g) for n, g in s.items()}
                    for w, s in zip(weights, raw)]  # fmt: skip
    else:
        ref = reference(kind, **KINDS[kind][1])
        expected = [ref.step(s) for s in raw]
    for k, (act, exp) in enumerate(zip(got, expected)):
        for name, e in exp.items():
            assert (act[name] is None) == (e is None), (k, name)
            if e is not None:
                scale = max(float(e.abs().max()), float(raw[k][name].double().abs().max()), 1e-30)
                assert float((act[name].double() - e).abs().max()) <= 4 * eps * scale, (k, name)
    if dtype == torch.float32:  # the multi-tensor path's rounding differs by a few ulps of the operands
        for k, (act, multi) in enumerate(zip(got, drive(kind, dtype, fused=False)[2])):
            for name, m in multi.items():
                scale = max(float(m.abs().max()), float(raw[k][name].abs().max())) if m is not None else 0.0
                assert m is None or float((act[name] - m).abs().max()) <= 2e-6 * scale, (k, name)


def test_built_once_and_reused() -> None:
    """After the first two steps (with and without statistics), no new graph: not as steps go by, not as the MA ring
    turns and its warm-up ends, not for a second model of the same shapes."""
    for kind in KINDS:
        drive(kind, torch.float32, steps=2, fused=True)
    graphs = counters["stats"]["unique_graphs"]
    for kind in KINDS:
        drive(kind, torch.float32, steps=9, fused=True)
    assert counters["stats"]["unique_graphs"] == graphs


def test_fused_is_refused_clearly_where_it_cannot_be_built(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="`foreach` and `fused` cannot both be True"):
        EMAFilter(model().parameters(), foreach=True, fused=True)
    monkeypatch.setattr(fused_module, "unavailable", lambda device: "no compiler here")
    net = model()
    net(torch.ones(2, 8)).sum().backward()
    with pytest.raises(RuntimeError, match=r"EMAFilter\(fused=True\): no compiler here\. Use fused=False or None"):
        EMAFilter(net.parameters(), fused=True).step()
    monkeypatch.setenv("LIGHTNING_GROKFAST_FUSED", "1")  # asked for by the environment: falls back without a word
    assert EMAFilter(net.parameters()).step().applied


def test_a_compiler_failure_is_reported_with_its_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(kernel: Any) -> Any:
        def run(*args: Any) -> None:
            raise RuntimeError("C++ compile error: cannot find g++")

        return run

    monkeypatch.setattr(fused_module, "_compiled", broken)
    net = model()
    net(torch.ones(2, 8)).sum().backward()
    before = snapshot(net.named_parameters())
    with pytest.raises(RuntimeError, match=r"could not build or run the fused kernel: C\+\+ compile error"):
        MAFilter(net.named_parameters(), window_size=3, fused=True).step()
    assert_state_equal(snapshot(net.named_parameters()), before)  # nothing written


FUSED_MATRIX = [
    "tests/test_callback.py::test_ema_matches_reference",
    "tests/test_callback.py::test_ma_matches_reference",
    "tests/test_callback.py::test_orthograd_callback_steps_the_optimizer_on_the_transformed_gradient",
    "tests/test_training_setups.py",
    "tests/test_checkpoints.py",
    "tests/test_sharded.py::test_each_transform_on_the_pieces_equals_one_process",
]


def test_the_suite_passes_with_fused_kernels(tmp_path: Path) -> None:
    """The Trainer matrix (parity, accumulation, non-finite steps with and without a scaler, clipping, manual
    optimization, unfreezing, 16-bit training, DDP, SWA, resume and crashes, FSDP2 and tensor parallel) with every
    transform fused: ``LIGHTNING_GROKFAST_FUSED=1`` makes ``fused=None`` fused, in this process and its children."""
    if os.environ.get("LIGHTNING_GROKFAST_FUSED") == "1":
        pytest.skip("already the fused run")
    env = os.environ | {"LIGHTNING_GROKFAST_FUSED": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *FUSED_MATRIX],
                         cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:]
    assert " passed" in run.stdout.splitlines()[-1] and "failed" not in run.stdout.splitlines()[-1]

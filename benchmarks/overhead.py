"""Overhead benchmark of the Grokfast filters: time, state memory and peak RSS, as ratios.

What one run measures, in one process, on four models (``--models`` picks a subset):

* ``example``: the 423k-parameter transformer of ``examples/modular_arithmetic.py`` (x * y mod 97);
* ``many-small``: 300 tiny ``Linear(32, 32) + LayerNorm(32)`` layers (1,200 tensors, 336k parameters),
  where the cost per tensor dominates;
* ``large``: three ``Linear(4096, 4096)`` (50.3M parameters, 200 MB of gradients), where the bytes
  moved dominate. Its MA filters run at window 10 only: window 100 would hold 100 x 200 MB per filter;
* ``large-ma``: three ``Linear(1824, 1824)`` (10.0M parameters), the stand-in of ``large`` for the MA
  filters at window 10 and 100 (ours and the authors').

For each model it times, interleaved (every repeat runs every variant once, in a fresh random order)
and summarized by the median:

* ``EMAFilter.step()`` (default: ``_foreach`` path with the inf/NaN check), with
  ``skip_nonfinite=False``, with ``foreach=False`` and with ``compute_stats=True``;
* ``MAFilter.step()`` at window 10 and 100 (full windows), at window 10 also ``foreach=False`` and
  ``compute_stats=True``;
* the authors' filters, re-implemented here from their description for comparison only: a Python loop
  over ``model.named_parameters()`` that allocates new tensors every step (EMA), and a ``deque`` per
  parameter summed in full every step (MA);
* the floor: the least memory traffic any Grokfast step needs, reading and writing the gradients and
  one state tensor once each: ``torch._foreach_copy_(state, grads)`` then
  ``torch._foreach_copy_(grads, state)``;
* one ``torch.optim.AdamW(foreach=True)`` step of the same parameters (torch's defaults otherwise);
* for ``example`` only: a whole training step (``zero_grad``, forward, backward, AdamW) on a batch of
  512 (``--batch``), without and with ``EMAFilter.step()``.

Gradients are random, copied in from a pool of two sets before every timed call, outside the timed
region (the filters change ``.grad`` in place; the reset also keeps the values finite, so the inf/NaN
check never skips the work). MA filters run with full windows: ours is stepped ``window`` times first,
the authors' deques are filled with ``window`` distinct tensors. The authors' loops run on a deep copy
of the model, since they replace every ``.grad`` storage at each step. Python's garbage collector is
paused inside each round and run between rounds, as ``timeit`` does.

Clock: on a CPU device with one torch thread (``--threads 1``) the tables use the CPU time of the
calling thread (``time.thread_time``; with one thread torch runs every op inline), because on a shared
machine the wall clock of a call doubles whenever another process takes the core, and longer calls are
hit more often, which biases the ratios. Otherwise (or with ``--clock wall``) the wall clock is used,
with ``torch.cuda.synchronize()`` around each call on CUDA. The JSON holds both.

It also reports the filter state bytes against the parameter bytes (``state_bytes()``; the authors'
state counted by distinct storages), ``step(compute_stats=True)`` against ``step()``, and the peak
RSS (``VmHWM``, reset before the training loop) of short training runs of the example model, one
subprocess per variant.

Timing on a shared machine is noisy: compare the ratios of one run, not absolute times across runs.

Examples:
    python benchmarks/overhead.py --threads 1 --json overhead.json
    python benchmarks/overhead.py --quick
    python benchmarks/overhead.py --models example many-small --repeats 100 --no-rss
    python benchmarks/overhead.py --device cuda --json overhead-cuda.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_grokfast import EMAFilter, MAFilter

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "modular_arithmetic.py"
MODELS = ("example", "many-small", "large", "large-ma")
RSS_VARIANTS = ("none", "ema", "ma", "authors_ema", "authors_ma")
RSS_LABELS = {
    "none": "no Grokfast",
    "ema": "EMA (ours)",
    "ma": "MA (ours)",
    "authors_ema": "EMA (authors')",
    "authors_ma": "MA (authors')",
}
ALPHA, EMA_LAMB, MA_LAMB = 0.98, 2.0, 5.0
P = 97  # modulus of the example task; vocabulary p + 2, context 4

VARIANT_LABELS = {
    "ema": "EMA step()",
    "ema_nocheck": "EMA step(), skip_nonfinite=False",
    "ema_loop": "EMA step(), foreach=False",
    "ema_stats": "EMA step(compute_stats=True)",
    "ma10": "MA w10 step()",
    "ma10_loop": "MA w10 step(), foreach=False",
    "ma10_stats": "MA w10 step(compute_stats=True)",
    "ma100": "MA w100 step()",
    "authors_ema": "authors' EMA loop",
    "authors_ma10": "authors' MA w10 loop",
    "authors_ma100": "authors' MA w100 loop",
    "floor": "floor (copy grads->state->grads)",
    "adamw": "AdamW step (foreach)",
    "train": "train step (fwd+bwd+AdamW)",
    "train_ema": "train step + EMA step()",
}

# (row label, numerator, denominator): every ratio is a quotient of two medians of one run.
RATIOS: tuple[tuple[str, str, str], ...] = (
    ("EMA / authors' EMA", "ema", "authors_ema"),
    ("EMA / floor", "ema", "floor"),
    ("EMA (skip_nonfinite=False) / floor", "ema_nocheck", "floor"),
    ("EMA / EMA (skip_nonfinite=False): cost of the inf/NaN check", "ema", "ema_nocheck"),
    ("EMA foreach=False / EMA", "ema_loop", "ema"),
    ("EMA / AdamW step", "ema", "adamw"),
    ("EMA compute_stats=True / EMA", "ema_stats", "ema"),
    ("MA w10 / authors' MA w10", "ma10", "authors_ma10"),
    ("MA w100 / authors' MA w100", "ma100", "authors_ma100"),
    ("MA w100 / MA w10", "ma100", "ma10"),
    ("MA w10 / floor", "ma10", "floor"),
    ("MA w10 / AdamW step", "ma10", "adamw"),
    ("MA w10 foreach=False / MA w10", "ma10_loop", "ma10"),
    ("MA w10 compute_stats=True / MA w10", "ma10_stats", "ma10"),
    ("EMA / train step (EMA's share)", "ema", "train"),
    ("train step + EMA / train step", "train_ema", "train"),
)


# --------------------------------------------------------------------------------------------
# The authors' filters, restated from their description (for comparison only)
# --------------------------------------------------------------------------------------------


def authors_ema(model: nn.Module, grads: Optional[dict[str, Tensor]], alpha: float, lamb: float) -> dict[str, Tensor]:
    """The authors' EMA filter as they describe it: a Python loop allocating new tensors every step.

    Args:
        model: The model whose ``.grad`` are filtered (the loop walks ``model.named_parameters()``).
        grads: The state returned by the previous call (``None`` on the first).
        alpha: EMA momentum.
        lamb: Amplification.

    Returns:
        The state to pass to the next call.
    """
    if grads is None:
        grads = {n: p.grad.data.detach() for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            grads[n] = grads[n] * alpha + p.grad.data.detach() * (1 - alpha)
            p.grad.data = p.grad.data + grads[n] * lamb
    return grads


def authors_ma(
    model: nn.Module, grads: Optional[dict[str, deque[Tensor]]], window_size: int, lamb: float
) -> dict[str, deque[Tensor]]:
    """The authors' MA filter as they describe it: a deque per parameter, summed in full every step.

    Args:
        model: The model whose ``.grad`` are filtered.
        grads: The state returned by the previous call (``None`` on the first).
        window_size: Window length.
        lamb: Amplification.

    Returns:
        The state to pass to the next call.
    """
    if grads is None:
        grads = {n: deque(maxlen=window_size) for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            grads[n].append(p.grad.data.detach())
            if len(grads[n]) == window_size:
                avg = sum(grads[n]) / len(grads[n])
                p.grad.data = p.grad.data + avg * lamb
    return grads


def distinct_bytes(tensors: Sequence[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def load_example() -> ModuleType:
    """Import ``examples/modular_arithmetic.py`` (not a package) as a module.

    Returns:
        The example module.
    """
    name = "lightning_grokfast_example_modular_arithmetic"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the example from {EXAMPLE}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def example_model() -> nn.Module:
    """The example's transformer: width 128, 2 layers, 4 heads, vocabulary 99, context 4 (423k parameters)."""
    return load_example().Transformer(P + 2, 128, 2, 4, max_len=4)


def example_batch(batch: int, device: torch.device, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A random batch of the example task: inputs ``[x, op, y, =]`` and targets ``x * y mod p``."""
    x = torch.randint(0, P, (batch,), generator=generator)
    y = torch.randint(1, P, (batch,), generator=generator)
    inputs = torch.stack([x, torch.full_like(x, P + 1), y, torch.full_like(x, P)], dim=1)
    return inputs.to(device), ((x * y) % P).to(device)


def example_loss(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy on the last position, as in the example."""
    return F.cross_entropy(model(inputs)[:, -1, :], targets)


def build_model(key: str, quick: bool) -> tuple[nn.Module, str]:
    """Build one benchmark model.

    Args:
        key: One of :data:`MODELS`.
        quick: Build a small stand-in (except ``example``, which is small already).

    Returns:
        The model and a short description.
    """
    if key == "example":
        return example_model(), "example transformer"
    if key == "many-small":
        layers = 30 if quick else 300
        mods: list[nn.Module] = []
        for _ in range(layers):
            mods += [nn.Linear(32, 32), nn.LayerNorm(32)]
        return nn.Sequential(*mods), f"{layers}x (Linear 32 + LayerNorm)"
    if key in ("large", "large-ma"):
        width = {("large", False): 4096, ("large-ma", False): 1824, ("large", True): 512, ("large-ma", True): 256}
        w = width[key, quick]
        return nn.Sequential(*(nn.Linear(w, w) for _ in range(3))), f"3x Linear {w}"
    raise ValueError(f"unknown model {key!r}; choose from {MODELS}")


@dataclass(frozen=True)
class ModelPlan:
    """Which variants a model runs.

    Attributes:
        ema: Run the EMA rows (ours and the authors').
        ma_windows: MA windows to run (ours and the authors').
        ma_extras: Also run MA w10 with ``foreach=False`` and ``compute_stats=True``.
        train: Also time whole training steps (the example only).
        note: Printed under the table.
    """

    ema: bool = True
    ma_windows: tuple[int, ...] = (10, 100)
    ma_extras: bool = True
    train: bool = False
    note: str = ""


PLANS = {
    "example": ModelPlan(train=True),
    "many-small": ModelPlan(),
    "large": ModelPlan(
        ma_windows=(10,),
        ma_extras=False,
        note="large: MA at window 10 only (window 100 would need 101 x 200 MB for ours and 100 x 200 MB for "
        "the authors'); MA at window 100 is measured on large-ma (10.0M parameters) instead.",
    ),
    "large-ma": ModelPlan(note="large-ma: the MA stand-in of large (EMA kept as a reference point)."),
}


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One timed variant: ``run`` is timed, ``prepare`` runs just before it, outside the timed region.

    Attributes:
        key: Row key (see :data:`VARIANT_LABELS`).
        run: The timed call.
        prepare: Untimed set-up before each call (resetting the gradients).
        max_repeats: Cap on the number of timed calls (slow variants), ``None`` for no cap.
        wall: Wall-clock seconds per timed call.
        cpu: CPU seconds per timed call (this thread's with one torch thread, else the process's).
    """

    key: str
    run: Callable[[], object]
    prepare: Optional[Callable[[], None]] = None
    max_repeats: Optional[int] = None
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_clock() -> Callable[[], float]:
    """The CPU-time clock: this thread's with one torch thread (ops then run inline), else the process's."""
    return time.thread_time if torch.get_num_threads() == 1 else time.process_time


def resolve_clock(clock: str, device: torch.device) -> str:
    """``auto`` -> ``cpu`` on a CPU device with one torch thread, else ``wall``.

    On a shared machine the wall clock of a call doubles whenever another process takes the core, and the
    longer a call the likelier that is; the thread's CPU time does not count that wait. On CUDA only the
    wall clock (with synchronization) sees the device's work.
    """
    if clock != "auto":
        return clock
    return "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"


def spread(n: int, repeats: int) -> set[int]:
    """``n`` round numbers spread evenly over ``range(repeats)`` (``n <= repeats``)."""
    return {i * repeats // n for i in range(n)}


def time_interleaved(variants: list[Variant], repeats: int, device: torch.device, seed: int) -> None:
    """Time every variant ``repeats`` times, in a fresh random order each round, on both clocks.

    A capped variant runs in evenly spaced rounds only, so its samples still spread over the whole run.
    Python's garbage collector is paused during each round and run between rounds, as ``timeit`` does:
    otherwise whichever call triggers a collection pays for traversing every live object (here, the
    authors' MA deques hold window x tensors-count tensor objects).

    Args:
        variants: The variants; their ``wall`` and ``cpu`` samples are filled.
        repeats: Number of rounds.
        device: Synchronized around each timed call.
        seed: Seed of the shuffles.
    """
    rng = random.Random(seed)
    cpu_time = cpu_clock()
    gc_was_enabled = gc.isenabled()
    for v in variants:  # one untimed warm-up call each
        if v.prepare is not None:
            v.prepare()
        v.run()
    capped = {id(v): spread(min(v.max_repeats, repeats), repeats) for v in variants if v.max_repeats is not None}
    for r in range(repeats):
        order = [v for v in variants if v.max_repeats is None or r in capped[id(v)]]
        rng.shuffle(order)
        gc.collect()
        gc.disable()  # as timeit does: a collection triggered by one call would bill it for all live objects
        for v in order:
            if v.prepare is not None:
                v.prepare()
            synchronize(device)
            start_cpu = cpu_time()
            start = time.perf_counter()
            v.run()
            synchronize(device)
            end = time.perf_counter()
            v.cpu.append(cpu_time() - start_cpu)
            v.wall.append(end - start)
        if gc_was_enabled:
            gc.enable()


@dataclass
class ModelResult:
    """What one model's run produced."""

    key: str
    description: str
    num_params: int
    num_tensors: int
    param_bytes: int
    samples: dict[str, list[float]]
    wall_samples: dict[str, list[float]]
    cpu_samples: dict[str, list[float]]
    clock: str
    state_bytes: dict[str, int]
    skipped_steps: int

    def medians_ms(self, samples: Optional[dict[str, list[float]]] = None) -> dict[str, float]:
        """Median milliseconds per variant (of ``samples``, by default those of the chosen clock)."""
        return {k: 1e3 * statistics.median(s) for k, s in (samples or self.samples).items() if s}

    def means_ms(self) -> dict[str, float]:
        """Mean milliseconds per variant (includes MA's occasional exact re-summation of the window)."""
        return {k: 1e3 * statistics.fmean(s) for k, s in self.samples.items() if s}

    def ratios(self) -> dict[str, Optional[float]]:
        """The :data:`RATIOS` of this model (``None`` where a variant was not run)."""
        med = self.medians_ms()
        return {label: (med[a] / med[b] if a in med and b in med else None) for label, a, b in RATIOS}


def gradient_reset(params: list[Tensor], pool: list[list[Tensor]]) -> Callable[[], None]:
    """A function that copies the next set of ``pool`` into the ``.grad`` of ``params`` (called untimed).

    Args:
        params: The parameters.
        pool: Sets of gradients, one tensor per parameter each, used in turn.

    Returns:
        The reset function.
    """
    turn = [0]

    def reset() -> None:
        src = pool[turn[0] % len(pool)]
        turn[0] += 1
        for p, g in zip(params, src):
            if p.grad is None:
                p.grad = g.clone()
        torch._foreach_copy_([p.grad for p in params], src)

    reset()
    return reset


def run_model(key: str, args: argparse.Namespace, device: torch.device) -> ModelResult:
    """Build one model, its variants, time them and measure their state.

    Args:
        key: One of :data:`MODELS`.
        args: Parsed command line.
        device: Where the model and gradients live.

    Returns:
        The timings and state sizes.
    """
    plan = PLANS[key]
    torch.manual_seed(args.seed)
    model, description = build_model(key, args.quick)
    model.to(device)
    named = list(model.named_parameters())
    params = [p for _, p in named]
    gen = torch.Generator().manual_seed(args.seed)
    pool = [[(1e-3 * torch.randn(p.shape, generator=gen)).to(device) for p in params] for _ in range(2)]
    # The authors' loops replace every `.grad` storage each step; they get their own copy of the model so
    # that their allocations leave the memory layout of the gradients the other variants see alone.
    authors_model = copy.deepcopy(model)
    authors_params = list(authors_model.parameters())
    reset = gradient_reset(params, pool)
    authors_reset = gradient_reset(authors_params, pool)

    def step_n(fn: Callable[[], object], n: int) -> None:
        for _ in range(n):
            reset()
            fn()

    slow = args.slow_repeats
    variants: list[Variant] = []
    filters: dict[str, EMAFilter | MAFilter] = {}
    authors_state_bytes: dict[str, Callable[[], int]] = {}

    if plan.ema:
        ema = filters["ema"] = EMAFilter(named, alpha=ALPHA, lamb=EMA_LAMB)
        ema_nocheck = filters["ema_nocheck"] = EMAFilter(named, alpha=ALPHA, lamb=EMA_LAMB, skip_nonfinite=False)
        ema_loop = filters["ema_loop"] = EMAFilter(named, alpha=ALPHA, lamb=EMA_LAMB, foreach=False)
        ema_stats = filters["ema_stats"] = EMAFilter(named, alpha=ALPHA, lamb=EMA_LAMB)
        authors_ema_state: list[Optional[dict[str, Tensor]]] = [None]

        def run_authors_ema() -> None:
            authors_ema_state[0] = authors_ema(authors_model, authors_ema_state[0], ALPHA, EMA_LAMB)

        authors_state_bytes["authors_ema"] = lambda: distinct_bytes(list((authors_ema_state[0] or {}).values()))
        variants += [
            Variant("ema", ema.step, reset),
            Variant("ema_nocheck", ema_nocheck.step, reset),
            Variant("ema_loop", ema_loop.step, reset),
            Variant("ema_stats", lambda: ema_stats.step(compute_stats=True), reset),
            Variant("authors_ema", run_authors_ema, authors_reset),
        ]

    for w in plan.ma_windows:
        ma = filters[f"ma{w}"] = MAFilter(named, window_size=w, lamb=MA_LAMB)
        step_n(ma.step, w)  # fill the window
        variants.append(Variant(f"ma{w}", ma.step, reset))
        if w == 10 and plan.ma_extras:
            ma_loop = filters["ma10_loop"] = MAFilter(named, window_size=w, lamb=MA_LAMB, foreach=False)
            ma_stats = filters["ma10_stats"] = MAFilter(named, window_size=w, lamb=MA_LAMB)
            step_n(ma_loop.step, w)
            step_n(ma_stats.step, w)
            variants += [
                Variant("ma10_loop", ma_loop.step, reset),
                Variant("ma10_stats", partial(ma_stats.step, compute_stats=True), reset),
            ]
        # the authors' deques, full of distinct raw gradients, as after `w` steps with fresh .grad tensors
        state: dict[str, deque[Tensor]] = {
            n: deque((pool[i % 2][j].clone() for i in range(w)), maxlen=w) for j, (n, _) in enumerate(named)
        }
        holder = [state]

        def run_authors_ma(holder: list[dict[str, deque[Tensor]]] = holder, w: int = w) -> None:
            holder[0] = authors_ma(authors_model, holder[0], w, MA_LAMB)

        def held_bytes(holder: list[dict[str, deque[Tensor]]] = holder) -> int:
            return distinct_bytes([t for d in holder[0].values() for t in d])

        authors_state_bytes[f"authors_ma{w}"] = held_bytes
        variants.append(Variant(f"authors_ma{w}", run_authors_ma, authors_reset, max_repeats=slow))

    floor_state = [torch.empty_like(p) for p in params]

    def run_floor() -> None:
        grads = [p.grad for p in params]
        torch._foreach_copy_(floor_state, grads)
        torch._foreach_copy_(grads, floor_state)

    adamw = torch.optim.AdamW(params, foreach=True)
    variants += [Variant("floor", run_floor, reset), Variant("adamw", adamw.step, reset)]

    if plan.train:
        inputs, targets = example_batch(args.batch, device, gen)
        train_opt = torch.optim.AdamW(params, foreach=True)
        train_ema_filter = filters["train_ema"] = EMAFilter(named, alpha=ALPHA, lamb=EMA_LAMB)

        def train_step(grokfast: Optional[EMAFilter] = None) -> None:
            train_opt.zero_grad(set_to_none=True)
            example_loss(model, inputs, targets).backward()
            if grokfast is not None:
                grokfast.step()
            train_opt.step()

        variants += [Variant("train", train_step), Variant("train_ema", lambda: train_step(train_ema_filter))]

    only = set(args.variants) if args.variants else None
    if only is not None:
        variants = [v for v in variants if v.key in only]
    time_interleaved(variants, args.repeats, device, args.seed)
    clock = resolve_clock(args.clock, device)

    num_params = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    timed = {v.key for v in variants}
    state_bytes = {k: f.state_bytes() for k, f in filters.items() if k in ("ema", "ma10", "ma100") and k in timed}
    state_bytes.update({k: probe() for k, probe in authors_state_bytes.items() if k in timed})
    skipped = sum(f.skipped_steps for f in filters.values())
    return ModelResult(
        key=key,
        description=description,
        num_params=num_params,
        num_tensors=len(params),
        param_bytes=param_bytes,
        samples={v.key: (v.cpu if clock == "cpu" else v.wall) for v in variants},
        wall_samples={v.key: v.wall for v in variants},
        cpu_samples={v.key: v.cpu for v in variants},
        clock=clock,
        state_bytes=state_bytes,
        skipped_steps=skipped,
    )


# --------------------------------------------------------------------------------------------
# Peak RSS of short training runs (one subprocess per variant)
# --------------------------------------------------------------------------------------------


def _proc_status_bytes(field_name: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` (Linux) in bytes, ``None`` where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux >= 4.0); False where impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: ``VmHWM`` where there is one, else ``ru_maxrss``.

    ``ru_maxrss`` is not used on Linux: it survives ``exec`` and so starts at the parent's size.
    """
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """Current resident set size (``VmRSS``), or the peak where the current size is unavailable."""
    rss = _proc_status_bytes("VmRSS")
    return rss if rss is not None else peak_rss_bytes()


def rss_worker(variant: str, steps: int, window: int, batch: int, device: torch.device, seed: int) -> dict[str, Any]:
    """Train the example model for ``steps`` steps with one filter variant and report its peak memory.

    Args:
        variant: One of :data:`RSS_VARIANTS`.
        steps: Training steps (more than ``window`` so that the MA windows fill).
        window: MA window.
        batch: Batch size.
        device: Where to train.
        seed: Seed of the model and the batches.

    Returns:
        Peak RSS before and after training, the filter state bytes, and the CUDA peak on CUDA.
    """
    torch.manual_seed(seed)
    model = example_model().to(device)
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), foreach=True)
    gen = torch.Generator().manual_seed(seed)
    batches = [example_batch(batch, device, gen) for _ in range(4)]
    ours: Optional[EMAFilter | MAFilter] = None
    if variant == "ema":
        ours = EMAFilter(named, alpha=ALPHA, lamb=EMA_LAMB)
    elif variant == "ma":
        ours = MAFilter(named, window_size=window, lamb=MA_LAMB)
    ema_state: Optional[dict[str, Tensor]] = None
    ma_state: Optional[dict[str, deque[Tensor]]] = None
    gc.collect()
    before = current_rss_bytes()
    peak_was_reset = reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps):
        optimizer.zero_grad(set_to_none=True)
        example_loss(model, *batches[i % len(batches)]).backward()
        if ours is not None:
            ours.step()
        elif variant == "authors_ema":
            ema_state = authors_ema(model, ema_state, ALPHA, EMA_LAMB)
        elif variant == "authors_ma":
            ma_state = authors_ma(model, ma_state, window, MA_LAMB)
        optimizer.step()
    synchronize(device)
    if ours is not None:
        state = ours.state_bytes()
    elif ema_state is not None:
        state = distinct_bytes(list(ema_state.values()))
    elif ma_state is not None:
        state = distinct_bytes([t for d in ma_state.values() for t in d])
    else:
        state = 0
    out: dict[str, Any] = {
        "variant": variant,
        "steps": steps,
        "batch": batch,
        "window": window,
        "rss_before_training_bytes": before,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_is_training_only": peak_was_reset,
        "state_bytes": state,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }
    if device.type == "cuda":
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def measure_rss(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run :func:`rss_worker` in one subprocess per variant (concurrently with ``--quick``).

    Args:
        args: Parsed command line.

    Returns:
        One record per variant of ``--rss-variants``.
    """
    commands = [
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--rss-worker",
            variant,
            "--rss-steps",
            str(args.rss_steps),
            "--rss-window",
            str(args.rss_window),
            "--batch",
            str(args.batch),
            "--device",
            args.device,
            "--seed",
            str(args.seed),
        ]
        + (["--threads", str(args.threads)] if args.threads else [])
        for variant in args.rss_variants
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    results: list[dict[str, Any]] = []
    if args.quick:  # concurrent: peak RSS is per process, and the smoke test stays fast
        procs = [
            subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in commands
        ]
        outputs = [(p.communicate(), p.returncode) for p in procs]
    else:
        outputs = []
        for c in commands:
            done = subprocess.run(c, capture_output=True, text=True, env=env, check=False)
            outputs.append(((done.stdout, done.stderr), done.returncode))
    for variant, ((stdout, stderr), code) in zip(args.rss_variants, outputs):
        if code != 0:
            raise RuntimeError(f"RSS worker {variant!r} failed ({code}):\n{stderr[-3000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the benchmark ran."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["loadavg_at_start"] = list(os.getloadavg())
    return info


def fmt_ratio(x: Optional[float]) -> str:
    """A ratio with three significant digits, ``-`` when missing."""
    if x is None:
        return "-"
    return f"{x:.3g}"


def fmt_ms(x: Optional[float]) -> str:
    """Milliseconds, adaptive precision."""
    if x is None:
        return "-"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def column_name(r: ModelResult) -> str:
    """A model's column header."""
    n = r.num_params
    size = f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"
    return f"{r.key} ({size}, {r.num_tensors} t.)"


def evaluate_targets(results: dict[str, ModelResult]) -> list[dict[str, Any]]:
    """The CPU targets of the benchmark, each with its measured value and whether it is met.

    Args:
        results: Per-model results.

    Returns:
        One record per (target, model): ``target``, ``model``, ``value``, ``threshold``, ``met``
        (``None`` when not measured).
    """

    def ratio(model: str, a: str, b: str) -> Optional[float]:
        r = results.get(model)
        if r is None:
            return None
        med = r.medians_ms()
        return med[a] / med[b] if a in med and b in med else None

    checks: list[tuple[str, str, Optional[float], str, float]] = [
        (
            "EMA >= 3x faster than the authors' EMA loop",
            "many-small",
            ratio("many-small", "authors_ema", "ema"),
            ">=",
            3.0,
        ),
        ("EMA within 1.5x of the floor", "large", ratio("large", "ema", "floor"), "<=", 1.5),
    ]
    for m in MODELS:
        if m in results and "ma100" in results[m].samples:
            checks.append(("MA w100 within 1.3x of MA w10", m, ratio(m, "ma100", "ma10"), "<=", 1.3))
    for m in MODELS:
        if m in results and "ma100" in results[m].samples:
            checks.append(
                ("MA w100 >= 20x faster than the authors' MA w100", m, ratio(m, "authors_ma100", "ma100"), ">=", 20.0)
            )
    checks.append(("EMA < 3% of the example's training step", "example", ratio("example", "ema", "train"), "<=", 0.03))
    out = []
    for target, model, value, op, threshold in checks:
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        out.append({"target": target, "model": model, "value": value, "op": op, "threshold": threshold, "met": met})
    return out


def report(results: dict[str, ModelResult], targets: list[dict[str, Any]], rss: Optional[list[dict[str, Any]]]) -> str:
    """The printed report: ratio table, targets, medians, state bytes, peak RSS."""
    cols = [results[m] for m in MODELS if m in results]
    ratio_rows = []
    for label, _, _ in RATIOS:
        values = [r.ratios()[label] for r in cols]
        if any(v is not None for v in values):
            ratio_rows.append([label, *(fmt_ratio(v) for v in values)])
    clock = cols[0].clock if cols else "wall"
    clock_text = "CPU time of each call" if clock == "cpu" else "wall clock"
    parts = [f"## Ratios (medians of one interleaved run, {clock_text}; < 1 means the first is faster)", ""]
    parts.append(markdown_table(["ratio", *(column_name(r) for r in cols)], ratio_rows))
    notes = [PLANS[r.key].note for r in cols if PLANS[r.key].note]
    parts += ["", *notes] if notes else []

    parts += ["", "## Targets (CPU)", ""]
    target_rows = []
    for t in targets:
        status = "not measured" if t["met"] is None else ("met" if t["met"] else "MISSED")
        shown = (
            "-" if t["value"] is None else (f"{100 * t['value']:.2f}%" if t["threshold"] < 1 else fmt_ratio(t["value"]))
        )
        bound = f"{100 * t['threshold']:.0f}%" if t["threshold"] < 1 else f"{t['threshold']:g}"
        target_rows.append([t["target"], t["model"], shown, f"{t['op']} {bound}", status])
    parts.append(markdown_table(["target", "model", "measured", "needed", "status"], target_rows))

    parts += ["", f"## Medians (ms per call, {clock_text}; samples in brackets)", ""]
    keys = [k for k in VARIANT_LABELS if any(k in r.samples for r in cols)]
    rows = []
    for k in keys:
        cells = []
        for r in cols:
            s = r.samples.get(k)
            cells.append(f"{fmt_ms(1e3 * statistics.median(s))} [{len(s)}]" if s else "-")
        rows.append([VARIANT_LABELS[k], *cells])
    parts.append(markdown_table(["variant", *(column_name(r) for r in cols)], rows))

    parts += ["", "## Filter state (bytes / parameter bytes)", ""]
    state_rows = []
    for k, label in (
        ("ema", "EMA (ours)"),
        ("authors_ema", "EMA (authors')"),
        ("ma10", "MA w10 (ours)"),
        ("authors_ma10", "MA w10 (authors')"),
        ("ma100", "MA w100 (ours)"),
        ("authors_ma100", "MA w100 (authors')"),
    ):
        if any(k in r.state_bytes for r in cols):
            state_rows.append(
                [label, *(fmt_ratio(r.state_bytes[k] / r.param_bytes) if k in r.state_bytes else "-" for r in cols)]
            )
    parts.append(markdown_table(["filter", *(column_name(r) for r in cols)], state_rows))
    parts.append("parameter MB: " + ", ".join(f"{r.key} {r.param_bytes / 2**20:.1f}" for r in cols))

    if rss:
        parts += ["", "## Peak RSS while training the example model (one subprocess per variant)", ""]
        base = next((x for x in rss if x["variant"] == "none"), None)
        rows = []
        for x in rss:
            delta = None if base is None else (x["peak_rss_bytes"] - base["peak_rss_bytes"]) / 2**20
            row = [
                RSS_LABELS.get(x["variant"], x["variant"]),
                f"{x['rss_before_training_bytes'] / 2**20:.0f}",
                f"{x['peak_rss_bytes'] / 2**20:.0f}",
                "-" if delta is None else f"{delta:+.1f}",
                f"{x['state_bytes'] / 2**20:.1f}",
            ]
            if "cuda_peak_bytes" in x:
                row.append(f"{x['cuda_peak_bytes'] / 2**20:.0f}")
            rows.append(row)
        header = ["variant", "RSS before MB", "peak RSS MB", "peak vs none MB", "filter state MB"]
        if "cuda_peak_bytes" in rss[0]:
            header.append("CUDA peak MB")
        parts.append(markdown_table(header, rows))
        scope = "the training loop only" if all(x["peak_is_training_only"] for x in rss) else "the whole process"
        parts.append(
            f"{rss[0]['steps']} training steps, batch {rss[0]['batch']}, MA window {rss[0]['window']}; peak over "
            f"{scope}; parameters {rss[0]['param_bytes'] / 2**20:.2f} MB"
        )
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line (``--quick`` changes the defaults of repeats and RSS steps)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="models to run")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 50; --quick 3)")
    parser.add_argument(
        "--slow-repeats", type=int, default=None, help="cap for the authors' MA loops (default 12; --quick 2)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's; --quick: 1)"
    )
    parser.add_argument(
        "--clock",
        choices=("auto", "cpu", "wall"),
        default="auto",
        help="what the tables use: CPU time of the calls or wall clock (auto: cpu on CPU with --threads 1)",
    )
    parser.add_argument("--batch", type=int, default=None, help="batch of the training steps (default 512; --quick 64)")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers to this JSON file")
    parser.add_argument("--quick", action="store_true", help="small models and few repeats (a smoke test)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--rss-steps", type=int, default=None, help="training steps per RSS run (default 120)")
    parser.add_argument("--rss-window", type=int, default=None, help="MA window of the RSS runs (default 100)")
    parser.add_argument(
        "--rss-variants", nargs="+", choices=RSS_VARIANTS, default=list(RSS_VARIANTS), help="peak-RSS runs to make"
    )
    parser.add_argument("--variants", nargs="+", default=None, help="time only these variant keys")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rss-worker", choices=RSS_VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and args.threads is None:
        args.threads = 1  # several threads on a busy shared machine can be many times slower
    defaults = {
        "repeats": (50, 3),
        "slow_repeats": (12, 2),
        "batch": (512, 64),
        "rss_steps": (120, 12),
        "rss_window": (100, 10),
    }
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.repeats < 1 or args.slow_repeats < 1:
        parser.error("--repeats and --slow-repeats must be positive")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the benchmark, print the report and optionally write the JSON.

    Args:
        argv: Command line (default ``sys.argv[1:]``).

    Returns:
        Everything written to the JSON file.
    """
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:  # leave an in-process caller (the smoke test) as it was
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    """The body of :func:`main`, with the threads set."""
    device = torch.device(args.device)
    if args.rss_worker is not None:
        record = rss_worker(args.rss_worker, args.rss_steps, args.rss_window, args.batch, device, args.seed)
        print(json.dumps(record))
        return record

    machine = machine_info(device)
    started = time.perf_counter()
    results: dict[str, ModelResult] = {}
    for key in MODELS:
        if key not in args.models:
            continue
        t0 = time.perf_counter()
        results[key] = run_model(key, args, device)
        print(f"[{key}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rss = None if args.no_rss else measure_rss(args)
    targets = evaluate_targets(results)
    text = report(results, targets, rss)
    if hasattr(os, "getloadavg"):
        machine["loadavg_at_end"] = list(os.getloadavg())
    print(text)
    skipped = sum(r.skipped_steps for r in results.values())
    if skipped:
        print(f"WARNING: the filters skipped {skipped} steps for inf/NaN gradients; the timings are invalid.")
    settings = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("rss_worker", "json")
    }
    settings.update(
        {"alpha": ALPHA, "ema_lamb": EMA_LAMB, "ma_lamb": MA_LAMB, "wall_s": round(time.perf_counter() - started, 1)}
    )
    data: dict[str, Any] = {
        "settings": settings,
        "machine": machine,
        "models": {
            key: {
                "description": r.description,
                "num_params": r.num_params,
                "num_tensors": r.num_tensors,
                "param_bytes": r.param_bytes,
                "clock": r.clock,
                "medians_ms": r.medians_ms(),
                "means_ms": r.means_ms(),
                "medians_wall_ms": r.medians_ms(r.wall_samples),
                "medians_cpu_ms": r.medians_ms(r.cpu_samples),
                "num_samples": {k: len(s) for k, s in r.samples.items()},
                "ratios": r.ratios(),
                "state_bytes": r.state_bytes,
                "state_over_param_bytes": {k: b / r.param_bytes for k, b in r.state_bytes.items()},
                "skipped_steps": r.skipped_steps,
                "note": PLANS[key].note,
            }
            for key, r in results.items()
        },
        "targets": targets,
        "peak_rss": rss,
        "report": text,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.json}")
    return data


if __name__ == "__main__":
    main()

"""Per-step cost of the Grokfast filters and OrthoGrad, measured with ``torch.utils.benchmark``.

Each case is a ``Timer`` (``--threads`` torch threads, default 1; on CPU it reads the thread's CPU time, so other
jobs on the machine do not inflate a case) run by ``blocked_autorange``; ``Compare`` prints the tables, each
followed by ratios of medians of this one run (``A / B``: below 1, A is faster). Sections: 1. ours vs the authors'
loops (restated below from their description); 2. vs the memory floor; 3. vs AdamW; 4. share of the example's
training step; 5. MA window independence; 6. ``compute_stats``; 7. bfloat16 with and without the float32 state;
8. OrthoGrad and fused GrokFastAdamW vs peers (optional packages: "not installed" when absent); 9. the fused kernels
(``fused=True``) vs the multi-tensor path, AdamW(fused=True) and the floor, and their first (compiling) step; then
the state bytes per parameter byte and, on CUDA, ``torch.cuda.max_memory_allocated`` during each case.

The filters change ``.grad`` in place and are timed back to back on the same gradients, so all run with
``lamb=1e-6``, which keeps the gradients finite over millions of calls; the work does not depend on ``lamb``.
Run: ``OMP_NUM_THREADS=1 python benchmarks/overhead.py [--quick] [--json PATH] [--device cuda] [--threads N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import platform
import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._inductor.utils import fresh_inductor_cache
from torch.autograd.graph import increment_version
from torch.utils import benchmark

from lightning_grokfast import EMAFilter, MAFilter, OrthoGrad

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the examples, as a script sees them
from modular_arithmetic import Transformer

ALPHA, LAMB = 0.98, 1e-6  # see the module docstring for the small lamb
VOCAB, SEQ = 99, 4  # the example: x * y mod 97, vocabulary p + 2, context 4
Table = dict[str, dict[str, dict[str, Any]]]
TITLES = {
    "authors": "1. Ours vs the authors' loops",
    "floor": "2. EMA vs the memory floor (one read and one write of the gradients: _foreach_copy_)",
    "adamw": "3. Filter step vs an AdamW step (foreach=True, and fused=True) on the same parameters",
    "train": "4. EMA share of the example's training step (forward + backward + Adam)",
    "window": "5. MA window independence (medians of table 1)",
    "stats": "6. EMA step(compute_stats=True) vs step()",
    "bf16": "7. bfloat16 parameters: EMA with fp32_state=True vs False",
    "orthograd": "8. OrthoGrad and fused GrokFastAdamW vs peers",
    "fused": "9. Fused kernels (fused=True: torch.compile) vs the multi-tensor path, AdamW(fused=True) and the floor",
    "memory": "Memory: filter state bytes / parameter bytes (state_bytes() after the timed steps; OrthoGrad has none)",
}
EMA, MA10, MA100 = "EMA (ours)", "MA w10 (ours)", "MA w100 (ours)"
A_EMA, A_MA10, A_MA100 = "EMA (authors')", "MA w10 (authors')", "MA w100 (authors')"
OG, OG_LOOP, OG_REF = "OrthoGrad (ours, foreach)", "OrthoGrad (ours, foreach=False)", "OrthoGrad reference loop"
PO_OG, PO_OG_FE = "pytorch_optimizer OrthoGrad", "pytorch_optimizer OrthoGrad foreach=True"
EMA_ADAMW, PO_GF = "EMA + AdamW step (ours)", "pytorch_optimizer GrokFastAdamW"
EMA_FADAMW, FADAMW = "EMA + AdamW(fused=True) step (ours)", "AdamW step (fused=True)"
FUSED = {"EMA": "EMA (ours, fused)", "MA w10": "MA w10 (ours, fused)", "OrthoGrad": "OrthoGrad (ours, fused)"}
UNCHECKED = "EMA (ours, fused, skip_nonfinite=False)"  # the kernel alone: no read of the gradients for inf/NaN
MULTI = {"EMA": EMA, "MA w10": MA10, "OrthoGrad": OG}
PO_GF_FE, LU_GF = "pytorch_optimizer GrokFastAdamW foreach=True", "grokfast_pytorch GrokFastAdamW"
RATIOS: dict[str, list[tuple[str, str]]] = {  # section: (numerator row, denominator row); "window" reads table 1
    "authors": [(EMA, A_EMA), (MA10, A_MA10), (MA100, A_MA100)],
    "floor": [(EMA, "floor")],
    "adamw": [(EMA, "AdamW step"), (MA10, "AdamW step"), (OG, "AdamW step"), (EMA, FADAMW)],
    "train": [("EMA step", "training step")],
    "window": [(MA100, MA10), (A_MA100, A_MA10)],
    "stats": [("compute_stats=True", "step()")],
    "bf16": [("fp32_state=True", "fp32_state=False")],
    "orthograd": [(OG, OG_REF), (OG_LOOP, OG_REF), (OG, PO_OG), (OG, PO_OG_FE)]
    + [(ours, peer) for ours in (EMA_ADAMW, EMA_FADAMW) for peer in (PO_GF, PO_GF_FE, LU_GF)],
    "fused": [(FUSED[k], MULTI[k]) for k in FUSED]
    + [(FUSED[k], FADAMW) for k in FUSED]
    + [(UNCHECKED, FADAMW), (FUSED["EMA"], "floor"), (UNCHECKED, "floor")],
}


class Authors:
    """What the authors' filters share: the size of their state ``grads`` (tensors, or deques of tensors)."""

    def state_bytes(self) -> int:
        items = [t for v in (self.grads or {}).values() for t in (v if isinstance(v, deque) else [v])]
        return sum(t.numel() * t.element_size() for t in items)


class AuthorsEMA(Authors):
    """The authors' ``gradfilter_ema``, restated: per parameter, new tensors every step, ``.grad`` replaced."""

    def __init__(self, model: nn.Module, alpha: float, lamb: float) -> None:
        self.model, self.alpha, self.lamb, self.grads = model, alpha, lamb, None

    def step(self) -> None:
        if self.grads is None:
            self.grads = {n: p.grad.data.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                self.grads[n] = self.grads[n] * self.alpha + p.grad.data.detach() * (1 - self.alpha)
                p.grad.data = p.grad.data + self.grads[n] * self.lamb


class AuthorsMA(Authors):
    """The authors' ``gradfilter_ma``, restated: a deque of gradients per parameter, summed whole every step."""

    def __init__(self, model: nn.Module, window: int, lamb: float) -> None:
        self.model, self.window, self.lamb, self.grads = model, window, lamb, {}

    def step(self) -> None:
        for n, p in self.model.named_parameters():
            if p.requires_grad:
                q = self.grads.setdefault(n, deque(maxlen=self.window))
                q.append(p.grad.data.detach())
                if len(q) == self.window:
                    p.grad.data = p.grad.data + sum(q) / len(q) * self.lamb


def reference_orthograd(params: Sequence[Tensor]) -> None:
    """Per-tensor OrthoGrad, as ``pytorch_optimizer.OrthoGrad`` does it without foreach."""
    for p in params:
        w, g = p.detach().reshape(-1).float(), p.grad.reshape(-1).float()
        proj = torch.dot(w, g) / (torch.dot(w, w) + 1e-30)
        g_ortho = g - proj * w
        p.grad.copy_((g_ortho * (g.norm() / (g_ortho.norm() + 1e-30))).view_as(p.grad))


class Shape:
    """A model with a fixed pool of random gradients; :meth:`fresh` gives every parameter a new ``.grad`` copy."""

    def __init__(self, name: str, model: nn.Module, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.name, self.model = name, model.to(device=device, dtype=dtype)
        self.params = list(self.model.parameters())
        self.pool = [torch.randn_like(p) for p in self.params]
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.params)

    def fresh(self) -> list[tuple[str, Tensor]]:
        for p, g in zip(self.params, self.pool):
            p.grad = g.clone()
        return list(self.model.named_parameters())


def transformer() -> nn.Module:
    """The example's transformer (width 128, 2 layers, 4 heads, context 4; 423k parameters)."""
    return Transformer(VOCAB, 128, 2, 4, max_len=SEQ)


def build_shapes(quick: bool, device: torch.device, dtype: torch.dtype = torch.float32) -> list[Shape]:
    torch.manual_seed(0)
    layers, width = (30, 128) if quick else (300, 2500)  # wide-mlp: 25M parameters in 8 tensors
    small = nn.Sequential(*(m for _ in range(layers) for m in (nn.Linear(32, 32), nn.LayerNorm(32))))
    wide = nn.Sequential(*(nn.Linear(width, width) for _ in range(4)))
    models = {"many-small": small, "transformer": transformer(), "wide-mlp": wide}
    return [Shape(name, model, device, dtype) for name, model in models.items()]


def optional(module: str, attr: str) -> Optional[Any]:
    with contextlib.suppress(ImportError):
        return getattr(importlib.import_module(module), attr)
    return None


class Bench:
    """Times cases and keeps their measurements, medians (seconds) and CUDA peaks by section, row and column."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.device = args, torch.device(args.device)
        self.measurements: dict[str, list[benchmark.Measurement]] = defaultdict(list)
        self.medians: Table = defaultdict(lambda: defaultdict(dict))  # section -> row -> column -> seconds
        self.extra: Table = defaultdict(lambda: defaultdict(dict))  # rows of the ratio tables that are no time ratios
        self.cuda_peak: Table = defaultdict(lambda: defaultdict(dict))
        self.not_installed: set[str] = set()
        self.skipped = 0  # steps our transforms skipped (inf/NaN or repeated gradients): their timings would be invalid
        self.params: list[Tensor] = []  # the parameters whose gradients the cases being timed use

    def time(self, section: str, row: str, col: str, fn: Optional[Callable[[], object]]) -> None:
        if fn is None:  # a peer that is not installed
            self.medians[section][row][col] = None
            return self.not_installed.add(row)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        spec = {"label": TITLES[section], "sub_label": row, "description": col, "num_threads": self.args.threads}
        clock = time.thread_time if self.device.type == "cpu" else time.perf_counter  # CPU: no waits for a core
        # as after a backward, every gradient is new to the transforms (which leave alone one they transformed)
        grads = [p.grad for p in self.params if p.grad is not None]
        timer = benchmark.Timer("new(grads); fn()", globals={"fn": fn, "new": increment_version, "grads": grads},
                                timer=clock, **spec)  # fmt: skip
        m = timer.blocked_autorange(min_run_time=self.args.min_run_time)
        self.measurements[section].append(m)
        self.medians[section][row][col] = m.median
        transform = getattr(fn, "__self__", None)
        self.skipped += getattr(transform, "skipped_steps", 0) + getattr(transform, "repeated_steps", 0)
        if self.device.type == "cuda":
            self.cuda_peak[section][row][col] = torch.cuda.max_memory_allocated()

    def ratios(self, section: str) -> dict[str, dict[str, Optional[float]]]:
        src = self.medians.get("authors" if section == "window" else section, {})
        out = {}
        for a, b in RATIOS.get(section, []):
            num, den = src.get(a, {}), src.get(b, {})
            out[f"{a} / {b}"] = {c: num[c] / den[c] if num.get(c) and den.get(c) else None for c in {**num, **den}}
        return {**out, **self.extra.get(section, {})}

    def report(self, section: str) -> None:
        print(f"\n== {TITLES[section]} ==")
        if section in self.measurements:
            benchmark.Compare(self.measurements[section]).print()
        absent = sorted(r for r in self.not_installed if r in self.medians.get(section, {}))
        if absent:
            print("not installed: " + ", ".join(absent))
        print_table("ratio of medians" if section != "memory" else "state / parameter bytes", self.ratios(section))


def print_table(head: str, rows: dict[str, dict[str, Optional[float]]]) -> None:
    """A plain table, one row per name; a missing value is "-", or "not-installed" in a row about a peer."""
    cols, width = list(dict.fromkeys(c for v in rows.values() for c in v)), max(map(len, [head, *rows])) + 2
    print(f"  {head:<{width}}" + "".join(f"{c:>16}" for c in cols))
    for name, vals in rows.items():
        missing = "not-installed" if any(peer in name for peer in ("pytorch_optimizer", "grokfast_pytorch")) else "-"
        cells = [missing if vals.get(c) is None else f"{vals[c]:.3g}" for c in cols]
        print(f"  {name:<{width}}" + "".join(f"{x:>16}" for x in cells))


def sections_per_shape(b: Bench, s: Shape) -> None:
    """Sections 1, 2, 3, 6 and 8 and the state bytes on one model shape."""
    col, n = s.name, s.param_bytes
    b.params = s.params
    for row, make, fill in (
        (EMA, lambda: EMAFilter(s.fresh(), ALPHA, LAMB), 1),
        (A_EMA, lambda: AuthorsEMA(s.model, ALPHA, LAMB), 1),
        (MA10, lambda: MAFilter(s.fresh(), 10, LAMB), 10),
        (A_MA10, lambda: AuthorsMA(s.model, 10, LAMB), 10),
        (MA100, lambda: MAFilter(s.fresh(), 100, LAMB), 100),
        (A_MA100, lambda: AuthorsMA(s.model, 100, LAMB), 100),
    ):
        f = make()
        for _ in range(fill):  # full windows; the authors' deques hold distinct tensors, as in training
            if isinstance(f, Authors):
                s.fresh()
            increment_version([p.grad for p in s.params])
            f.step()
        b.time("authors", row, col, f.step)
        b.extra["memory"][row][col] = f.state_bytes() / n
        del f
        gc.collect()
    ema = EMAFilter(s.fresh(), ALPHA, LAMB)
    floor_state = [g.clone() for g in s.pool]  # the floor reads the pool of gradients, writes its own copy
    b.time("floor", EMA, col, ema.step)
    b.time("floor", "floor", col, lambda: torch._foreach_copy_(floor_state, s.pool))
    ma, og = MAFilter(s.fresh(), 10, LAMB), OrthoGrad(s.fresh())
    for _ in range(10):
        increment_version([p.grad for p in s.params])
        ma.step()
    adamw = torch.optim.AdamW(s.params, foreach=True)  # the first call of each timer (a warm-up) makes the state
    fused_adamw = torch.optim.AdamW(s.params, fused=True)
    for row, fn in ((EMA, ema.step), (MA10, ma.step), (OG, og.step), ("AdamW step", adamw.step)):
        b.time("adamw", row, col, fn)
    b.time("adamw", FADAMW, col, fused_adamw.step)
    b.time("stats", "step()", col, ema.step)
    b.time("stats", "compute_stats=True", col, lambda: ema.step(compute_stats=True))
    b.time("orthograd", OG, col, og.step)
    b.time("orthograd", OG_LOOP, col, OrthoGrad(s.fresh(), foreach=False).step)
    b.time("orthograd", OG_REF, col, lambda: reference_orthograd(s.params))
    po_og, po_gf = optional("pytorch_optimizer", "OrthoGrad"), optional("pytorch_optimizer", "GrokFastAdamW")
    for row, fe in ((PO_OG, None), (PO_OG_FE, True)):
        peer = po_og(torch.optim.SGD(s.params, lr=0.0), foreach=fe) if po_og else None
        b.time("orthograd", row, col, (lambda p=peer: p.apply_orthogonal_gradients(s.params)) if peer else None)
    b.time("orthograd", EMA_ADAMW, col, lambda: (ema.step(), adamw.step()))
    b.time("orthograd", EMA_FADAMW, col, lambda: (ema.step(), fused_adamw.step()))
    lu_gf = optional("grokfast_pytorch", "GrokFastAdamW")
    for row, cls, kw in ((PO_GF, po_gf, {}), (PO_GF_FE, po_gf, {"foreach": True}), (LU_GF, lu_gf, {})):
        opt = cls(s.params, grokfast_lamb=LAMB, **kw) if cls else None
        b.time("orthograd", row, col, opt.step if opt else None)
    b.skipped += ema.skipped_steps
    if not b.args.quick or s.name == "wide-mlp":  # --quick: one model, few tensors, to keep the compilations short
        fused_section(b, s, fused_adamw, floor_state)


def fused_section(b: Bench, s: Shape, fused_adamw: torch.optim.Optimizer, floor_state: list[Tensor]) -> None:
    """Section 9 on one model: each transform's multi-tensor and fused step, the fused AdamW step and the floor, and
    the first fused step, which compiles (from cold caches: the cost a user meets the first time) and after how many
    steps that pays."""
    col = s.name
    for kind, make in (("EMA", lambda **k: EMAFilter(s.fresh(), ALPHA, LAMB, **k)),
                       ("MA w10", lambda **k: MAFilter(s.fresh(), 10, LAMB, **k)),
                       ("OrthoGrad", lambda **k: OrthoGrad(s.fresh(), **k))):  # fmt: skip
        multi, fused = make(), make(fused=True)
        torch._dynamo.reset()
        with fresh_inductor_cache():  # a cold start: no kernel compiled before, in this process or on disk
            start = time.perf_counter()
            fused.step()
            b.extra["fused"][f"first step, {kind} (s)"][col] = time.perf_counter() - start
        for transform in (multi, fused):
            for _ in range(10):  # full windows
                increment_version([p.grad for p in s.params])
                transform.step()
        b.time("fused", MULTI[kind], col, multi.step)
        b.time("fused", FUSED[kind], col, fused.step)
        saved = b.medians["fused"][MULTI[kind]][col] - b.medians["fused"][FUSED[kind]][col]
        b.extra["fused"][f"steps for the compilation to pay, {kind}"][col] = (
            b.extra["fused"][f"first step, {kind} (s)"][col] / saved if saved > 0 else None
        )
    unchecked = EMAFilter(s.fresh(), ALPHA, LAMB, skip_nonfinite=False, fused=True)
    unchecked.step()
    b.time("fused", UNCHECKED, col, unchecked.step)
    b.time("fused", FADAMW, col, fused_adamw.step)
    b.time("fused", "floor", col, lambda: torch._foreach_copy_(floor_state, s.pool))


def train_section(b: Bench, quick: bool) -> None:
    """Section 4: one training step of the example's transformer vs an EMA step on its gradients."""
    batch = 64 if quick else 512
    torch.manual_seed(0)
    model = transformer().to(b.device)
    x = torch.randint(0, VOCAB, (batch, SEQ), device=b.device)
    y = torch.randint(0, VOCAB, (batch,), device=b.device)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    b.params = list(model.parameters())

    def train_step() -> None:
        adam.zero_grad(set_to_none=True)
        F.cross_entropy(model(x)[:, -1], y).backward()
        adam.step()

    col = f"transformer, batch {batch}"
    b.time("train", "training step", col, train_step)
    ema = EMAFilter(model.named_parameters(), ALPHA, LAMB)
    b.time("train", "EMA step", col, ema.step)
    ema_s, train_s = (b.medians["train"][row][col] for row in ("EMA step", "training step"))
    b.extra["train"]["EMA share of (training step + EMA)"][col] = ema_s / (ema_s + train_s)


def bf16_section(b: Bench, shapes: list[Shape]) -> None:
    """Section 7: bfloat16 parameters and gradients, the EMA state in float32 or in bfloat16."""
    for s in shapes:
        b.params = s.params
        for fp32 in (True, False):
            ema = EMAFilter(s.fresh(), ALPHA, LAMB, fp32_state=fp32)
            b.time("bf16", f"fp32_state={fp32}", s.name, ema.step)
            for what, held in (
                ("state_bytes", ema.state_bytes()),
                ("expected_state_bytes", ema.expected_state_bytes()),
            ):
                b.extra["bf16"][f"{what} / param bytes, fp32_state={fp32}"][s.name] = held / s.param_bytes


def machine(args: argparse.Namespace) -> dict[str, Any]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), platform.machine())
    info.update(cpu=cpu, threads=args.threads, device=args.device)
    if torch.device(args.device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small models and short timings (a smoke run)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", type=Path, default=None, help="write the medians and ratios here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every timer (default 1)")
    parser.add_argument("--min-run-time", type=float, default=None, help="seconds per case (default 3, --quick 0.02)")
    args = parser.parse_args(argv)
    args.min_run_time = args.min_run_time or (0.02 if args.quick else 3.0)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        b, info = Bench(args), machine(args)
        print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
        shapes = build_shapes(args.quick, b.device)
        print("models: " + "; ".join(f"{s.name} {sum(p.numel() for p in s.params):,} parameters" for s in shapes))
        for s in shapes:
            sections_per_shape(b, s)
        train_section(b, args.quick)
        del shapes  # before the bfloat16 copies are built
        bf16_section(b, build_shapes(args.quick, b.device, torch.bfloat16))
        for section in TITLES:
            b.report(section)
        if b.skipped:
            print(f"WARNING: {b.skipped} steps were skipped (inf/NaN or repeated gradients): timings invalid.")
        if b.cuda_peak:
            print("\n== CUDA: torch.cuda.max_memory_allocated during each case (MiB) ==")
            for section, rows in b.cuda_peak.items():
                print_table(section, {r: {c: v / 2**20 for c, v in cols.items()} for r, cols in rows.items()})
    finally:
        torch.set_num_threads(threads_before)
    data = {
        "machine": info,
        "settings": {"quick": args.quick, "min_run_time": args.min_run_time, "alpha": ALPHA, "lamb": LAMB},
        "not_installed": sorted(b.not_installed),
        "sections": {
            k: {"title": t, "medians_s": b.medians.get(k, {}), "ratios": b.ratios(k)} for k, t in TITLES.items()
        },
        "cuda_peak_bytes": b.cuda_peak,
    }
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return data


if __name__ == "__main__":
    main()

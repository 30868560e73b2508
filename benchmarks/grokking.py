"""Grokking sweep: steps to generalize, per method x weight decay x seed, on two tasks.

Every run is a subprocess of an example's LightningCLI (exactly what a user runs), with the task's
base config, ``--model.weight_decay``, ``--seed_everything`` and the method's callbacks appended to
``trainer.callbacks``. It stops when the validation accuracy reaches the task's threshold or at the
step budget. Each finished run is one JSON file, ``OUT/runs/<task>/<method>_wd<wd>_seed<seed>.json``:
a later invocation with the same ``--out`` skips it (unless the budget asked for is larger and it
did not reach the threshold), so the sweep grows over several sittings.

``--report`` (also run after every sweep) rebuilds, from the run files alone, ``OUT/results.json`` (every
run and the summaries), ``OUT/results.md`` (the tables: median and range per method and weight decay, and
each method's best against the best weight decay alone) and one figure per task, ``OUT/<task>.png``
(median steps against weight decay, one line per method, the seed range as a band; a run that hit the
budget counts as its budget and is marked ``>``).

Examples:
    python benchmarks/grokking.py --task modmul --methods none grokfast_ema --wd 0.001 0.003 --seeds 0 1 2
    python benchmarks/grokking.py --task digits --methods none orthograd --wd 0 1 2 --jobs 2
    python benchmarks/grokking.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "grokking"

GROKFAST = "lightning_grokfast.GrokfastCallback"
ORTHOGRAD = "lightning_grokfast.OrthoGradCallback"


def _cb(class_path: str, **init_args: Any) -> dict[str, Any]:
    return {"class_path": class_path, "init_args": init_args}


@dataclass(frozen=True)
class Task:
    """One grokking task: its example, base config, threshold, budget and methods."""

    title: str
    script: str
    config: str
    threshold: float
    budget: int
    methods: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


TASKS: dict[str, Task] = {
    "modmul": Task(
        title="x*y mod 97, 2-layer transformer, Adam",
        script="examples/modular_arithmetic.py",
        config="examples/configs/baseline.yaml",
        threshold=0.95,
        budget=6000,
        methods={
            "none": [],
            "grokfast_ema": [_cb(GROKFAST, filter="ema", alpha=0.98, lamb=2.0)],
            "grokfast_ma": [_cb(GROKFAST, filter="ma", window_size=100, lamb=5.0)],
            "orthograd": [_cb(ORTHOGRAD, apply_to="all")],
            "orthograd_matrices": [_cb(ORTHOGRAD, apply_to="matrices")],
            "orthograd_ema": [_cb(ORTHOGRAD, apply_to="all"), _cb(GROKFAST, filter="ema", alpha=0.98, lamb=2.0)],
        },
    ),
    "digits": Task(
        title="scikit-learn digits, 8x-scaled MLP, MSE, AdamW",
        script="examples/digits.py",
        config="examples/configs/digits/baseline.yaml",
        threshold=0.9,
        budget=10000,
        methods={
            "none": [],
            "grokfast_ema": [_cb(GROKFAST, filter="ema", alpha=0.8, lamb=0.1)],
            "orthograd": [_cb(ORTHOGRAD, apply_to="all")],
            "orthograd_matrices": [_cb(ORTHOGRAD, apply_to="matrices")],
        },
    ),
}


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run_path(out: Path, task: str, method: str, wd: float, seed: int) -> Path:
    """Where one run's record is stored."""
    return out / "runs" / task / f"{method}_wd{wd:g}_seed{seed}.json"


def is_done(path: Path, budget: int) -> bool:
    """Whether a stored run answers the question: it reached the threshold, or ran at least ``budget``."""
    if not path.exists():
        return False
    record = json.loads(path.read_text())
    return record["steps_to_threshold"] is not None or record["budget"] >= budget


def command(task: Task, method: str, wd: float, seed: int, budget: int, root_dir: Path) -> list[str]:
    """The example CLI command of one run."""
    cmd = [
        sys.executable, str(REPO / task.script), "fit", "--config", str(REPO / task.config),
        "--seed_everything", str(seed), "--model.weight_decay", str(wd), "--trainer.max_steps", str(budget),
        "--trainer.default_root_dir", str(root_dir), "--trainer.enable_progress_bar", "false",
        "--report.plot", "false",
    ]  # fmt: skip
    return cmd + [f"--trainer.callbacks+={json.dumps(cb)}" for cb in task.methods[method]]


def run_one(out: Path, logs: Path, name: str, method: str, wd: float, seed: int, budget: int) -> Optional[dict]:
    """Run one (task, method, weight decay, seed) and store its record; ``None`` when the run failed."""
    task = TASKS[name]
    tag = f"{name}/{method}_wd{wd:g}_seed{seed}"
    root_dir = logs / tag
    root_dir.mkdir(parents=True, exist_ok=True)
    log_path = root_dir / "run.log"
    cmd = command(task, method, wd, seed, budget, root_dir)
    # one torch thread per run, so that --jobs J uses J cores; the package importable from a checkout
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    print(f"[start] {tag}", flush=True)
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    summary = [line[9:].strip() for line in log_path.read_text().splitlines() if line.startswith("summary: ")]
    if proc.returncode != 0 or not summary:
        print(f"[fail]  {tag}: exit code {proc.returncode}, see {log_path}", flush=True)
        return None
    data = json.loads(Path(summary[-1]).read_text())
    record = {
        "task": name,
        "method": method,
        "settings": task.methods[method],
        "weight_decay": wd,
        "seed": seed,
        "threshold": data["threshold"],
        "steps_to_threshold": data["steps_to_threshold"],
        "budget": budget,
        "final_val_acc": data["final_val_acc"],
        "best_val_acc": data["best_val_acc"],
        "fit_s": round(data["fit_s"], 1),
        "val_curve": data["val_curve"],
    }
    path = run_path(out, name, method, wd, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)
    print(f"[done]  {tag}: steps_to_threshold={record['steps_to_threshold']} ({data['fit_s']:.0f} s)", flush=True)
    return record


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def load_runs(out: Path) -> list[dict[str, Any]]:
    """Every stored run record under ``out/runs``, in a stable order."""
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*.json"))]
    return sorted(records, key=lambda r: (r["task"], r["method"], r["weight_decay"], r["seed"]))


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median and range of steps over seeds; a run that missed counts as its budget, flagged ``>``."""
    steps = [r["steps_to_threshold"] if r["steps_to_threshold"] is not None else r["budget"] for r in records]
    missed = [r["steps_to_threshold"] is None for r in records]
    ranked = sorted(zip(steps, missed))
    med = statistics.median(steps)
    # the median is a lower bound when a run at or below it missed
    return {
        "seeds": [r["seed"] for r in records],
        "steps": [None if m else s for s, m in zip(steps, missed)],
        "median": med,
        "median_is_bound": any(m and s <= med for s, m in ranked),
        "min": ranked[0][0],
        "min_is_bound": ranked[0][1],
        "max": ranked[-1][0],
        "max_is_bound": ranked[-1][1],
        "reached": missed.count(False),
    }


def _fmt(value: float, bound: bool) -> str:
    return f"> {value:,.0f}" if bound else f"{value:,.0f}"


def _cell(s: dict[str, Any]) -> str:
    """``median (min-max)``, each marked ``>`` where it is a budget."""
    spread = f"{_fmt(s['min'], s['min_is_bound'])}-{_fmt(s['max'], s['max_is_bound'])}"
    return f"{_fmt(s['median'], s['median_is_bound'])} ({spread}, n={len(s['seeds'])})"


def aggregate(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{task: {method: {wd: summary}}}`` over the stored runs."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["task"], r["method"], r["weight_decay"]), []).append(r)
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for (task, method, wd), rs in sorted(groups.items()):
        table.setdefault(task, {}).setdefault(method, {})[f"{wd:g}"] = summarize(rs)
    return table


def best(by_wd: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The weight decay with the lowest median (ties: the smaller maximum)."""
    return min(by_wd.items(), key=lambda kv: (kv[1]["median"], kv[1]["max"]))


def markdown(table: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Per task: median (range) per method and weight decay, then each method's best against the best of ``none``."""
    lines: list[str] = []
    for task, methods in table.items():
        wds = sorted({float(wd) for by_wd in methods.values() for wd in by_wd})
        lines += [f"### {task} ({TASKS[task].title}): steps to {TASKS[task].threshold:g} validation accuracy", ""]
        lines += ["Median (range) over seeds; `>`: the run hit its step budget.", ""]
        lines.append("| method | " + " | ".join(f"wd {wd:g}" for wd in wds) + " |")
        lines.append("| --- |" + " --- |" * len(wds))
        for method, by_wd in methods.items():
            cells = ["-" if f"{wd:g}" not in by_wd else _cell(by_wd[f"{wd:g}"]) for wd in wds]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
        if "none" in methods:
            ref_wd, ref = best(methods["none"])
            lines += ["| method | best wd | median (range) | vs best weight decay alone |", "| --- | --- | --- | --- |"]
            for method, by_wd in methods.items():
                wd, s = best(by_wd)
                ratio = ref["median"] / s["median"]
                flag = "≤ " if s["median_is_bound"] else ("≥ " if ref["median_is_bound"] else "")
                lines.append(f"| {method} | {wd} | {_cell(s)} | {flag}{ratio:.2f}x |")
            lines += ["", f"(best weight decay alone: {ref_wd})", ""]
    return "\n".join(lines)


def plot(task: str, methods: dict[str, dict[str, Any]], path: Path) -> None:
    """Median steps against weight decay, one line per method, the seed range as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    wds_all = sorted({float(wd) for by_wd in methods.values() for wd in by_wd})
    pos = {wd: i for i, wd in enumerate(wds_all)}  # categorical x: the grid includes 0
    for method, by_wd in methods.items():
        items = sorted((float(wd), s) for wd, s in by_wd.items())
        x = [pos[wd] for wd, _ in items]
        line = ax.plot(x, [s["median"] for _, s in items], marker="o", label=method)[0]
        ax.fill_between(
            x, [s["min"] for _, s in items], [s["max"] for _, s in items], color=line.get_color(), alpha=0.15
        )
        for xi, (_, s) in zip(x, items):
            if s["median_is_bound"]:
                ax.annotate("budget", (xi, s["median"]), fontsize=7, ha="center", va="bottom")
    ax.set_xticks(range(len(wds_all)), [f"{wd:g}" for wd in wds_all])
    ax.set_yscale("log")
    ax.set_xlabel("weight decay")
    ax.set_ylabel(f"steps to {TASKS[task].threshold:g} val acc (median, range)")
    ax.set_title(f"{TASKS[task].title}: steps to generalize against weight decay", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out: Path, make_plot: bool = True) -> str:
    """Rebuild ``results.json`` and the figures from the stored runs; return the markdown tables."""
    records = load_runs(out)
    table = aggregate(records)
    slim = [{k: v for k, v in r.items() if k != "val_curve"} for r in records]
    (out / "results.json").write_text(json.dumps({"runs": slim, "summary": table}, indent=1) + "\n")
    if make_plot:
        for task, methods in table.items():
            plot(task, methods, out / f"{task}.png")
    text = markdown(table)
    (out / "results.md").write_text(
        "<!-- written by `python benchmarks/grokking.py --report`; the runs are in runs/, one file each -->\n\n"
        + text
        + "\n"
    )
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="modmul")
    parser.add_argument("--methods", nargs="+", default=["none"], help="method names of the task")
    parser.add_argument("--wd", nargs="+", type=float, default=[0.003], help="weight decays")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=None, help="step budget (default: the task's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, one torch thread each")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="run records, results.json, figures")
    parser.add_argument("--logs", type=Path, default=REPO / "grok_runs", help="the runs' Lightning logs")
    parser.add_argument("--report", action="store_true", help="only rebuild results.json and the figures")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if not args.report:
        task = TASKS[args.task]
        unknown = [m for m in args.methods if m not in task.methods]
        if unknown:
            parser.error(f"--methods {unknown} unknown for task {args.task}; choose from {sorted(task.methods)}")
        budget = args.budget or task.budget
        jobs = [
            (args.out, args.logs, args.task, m, wd, s, budget)
            for m in args.methods
            for wd in args.wd
            for s in args.seeds
            if not is_done(run_path(args.out, args.task, m, wd, s), budget)
        ]
        print(f"{len(jobs)} runs to do", flush=True)
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(lambda job: run_one(*job), jobs))
        if any(r is None for r in results):
            print(f"{results.count(None)} runs failed", file=sys.stderr)
    print(report(args.out, make_plot=not args.no_plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())

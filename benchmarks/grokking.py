"""Grokking benchmark: steps to 95% validation accuracy on x * y mod 97, side by side.

Runs every configuration of ``examples/configs`` (or those named) with the same seeds and the same
data split, each as a subprocess of the example's CLI, so that it measures exactly what
``python examples/modular_arithmetic.py fit --config ...`` does. Every run stops at 95% validation
accuracy or at its step budget.

Each finished run is stored as ``OUT/runs/<name>-seed<S>.json``; invocations with the same ``--out``
merge and skip runs already done, so the benchmark can be resumed or extended. Afterwards
``OUT/results.json`` (per-run results, per-config median/min/max and speed-ups over both the
no-weight-decay baseline and the weight-decay-only control) and ``OUT/val_acc.png`` are rebuilt from
``OUT/runs`` alone, and a markdown table is printed.

Examples:
    python benchmarks/grokking.py --out bench --configs weight_decay grokfast_ema grokfast_ma --seeds 3
    python benchmarks/grokking.py --out bench --configs baseline --budget 100000
    python benchmarks/grokking.py --out bench --report-only
    python benchmarks/grokking.py --out bench --import-run baseline 0 lightning_logs/grokking/baseline/csv/version_0

A run that does not reach 95% within its budget has ``steps_to_95: null``; in the summaries its
budget stands in for its step count, and every number derived from it is marked as a bound.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "modular_arithmetic.py"
CONFIG_DIR = REPO / "examples" / "configs"
REFERENCES = ("baseline", "weight_decay")
RESULT_KEYS = ("name", "seed", "steps_to_95", "wall_s", "fit_s", "final_val_acc", "best_val_acc", "budget")


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def available_configs(config_dir: Path = CONFIG_DIR) -> list[str]:
    """The YAML stems in the example's config directory, references first.

    Args:
        config_dir: Directory of the example's YAML configs.

    Returns:
        The config names.
    """
    return order_names([p.stem for p in sorted(config_dir.glob("*.yaml"))])


def order_names(names: Sequence[str]) -> list[str]:
    """Sort names with the references (baseline, weight_decay) first, then alphabetically.

    Args:
        names: Config names.

    Returns:
        The names in report order, without duplicates.
    """
    unique = sorted(set(names))
    return [n for n in REFERENCES if n in unique] + [n for n in unique if n not in REFERENCES]


def config_budget(config: Path) -> Optional[int]:
    """The ``trainer.max_steps`` of a YAML config.

    Args:
        config: Path of the YAML config.

    Returns:
        The step budget, or ``None`` when the config sets none.
    """
    data = yaml.safe_load(config.read_text()) or {}
    steps = (data.get("trainer") or {}).get("max_steps")
    return int(steps) if steps is not None and int(steps) >= 0 else None


def run_path(out: Path, name: str, seed: int) -> Path:
    """Where a finished run is stored.

    Args:
        out: The benchmark's output directory.
        name: Config name.
        seed: Seed.

    Returns:
        ``out/runs/<name>-seed<seed>.json``.
    """
    return out / "runs" / f"{name}-seed{seed}.json"


def is_done(path: Path, budget: Optional[int]) -> bool:
    """Whether a stored run answers the question for this budget (reached, or tried as long).

    Args:
        path: The stored run's JSON file.
        budget: The budget now asked for (``None``: the config's).

    Returns:
        True when the run need not be repeated.
    """
    if not path.exists():
        return False
    record = json.loads(path.read_text())
    if record.get("steps_to_95") is not None or budget is None:
        return True
    return record.get("budget") is not None and record["budget"] >= budget


def run_command(config: Path, seed: int, root_dir: Path, budget: Optional[int], overrides: Sequence[str]) -> list[str]:
    """The example CLI command of one run.

    Args:
        config: The YAML config.
        seed: ``seed_everything``.
        root_dir: The run's ``trainer.default_root_dir``.
        budget: ``trainer.max_steps`` (``None``: the config's).
        overrides: ``KEY=VALUE`` items, passed on as ``--KEY VALUE``.

    Returns:
        The argv list.
    """
    cmd = [
        sys.executable,
        str(EXAMPLE),
        "fit",
        "--config",
        str(config),
        "--seed_everything",
        str(seed),
        "--trainer.default_root_dir",
        str(root_dir),
        "--trainer.enable_progress_bar",
        "false",
    ]
    if budget is not None:
        cmd += ["--trainer.max_steps", str(budget)]
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--override expects KEY=VALUE, got {item!r}")
        cmd += [f"--{key.lstrip('-')}", value]
    return cmd


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # one torch thread per run, so that --jobs J uses J cores
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    # make lightning_grokfast importable from a source checkout
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_one(
    out: Path, name: str, seed: int, budget: Optional[int], overrides: Sequence[str]
) -> Optional[dict[str, Any]]:
    """Run one (config, seed) through the example CLI and store its result.

    Args:
        out: The benchmark's output directory.
        name: Config name (a YAML stem in ``examples/configs``).
        seed: Seed.
        budget: Step budget (``None``: the config's ``max_steps``).
        overrides: ``KEY=VALUE`` CLI overrides.

    Returns:
        The stored record, or ``None`` when the run failed (its log says why).
    """
    config = CONFIG_DIR / f"{name}.yaml"
    tag = f"{name}-seed{seed}"
    root_dir = out / "logs" / tag
    root_dir.mkdir(parents=True, exist_ok=True)
    log_path = out / "logs" / f"{tag}.log"
    cmd = run_command(config, seed, root_dir, budget, overrides)
    print(f"[start] {tag}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env(), cwd=REPO)
    wall = time.perf_counter() - start
    summary_file = None
    for line in log_path.read_text().splitlines():
        if line.startswith("summary: "):
            summary_file = Path(line[len("summary: ") :].strip())
    if proc.returncode != 0 or summary_file is None or not summary_file.exists():
        print(f"[fail]  {tag}: exit code {proc.returncode}, see {log_path}", flush=True)
        return None
    record = load_summary(summary_file, name, seed)
    record["wall_s"] = wall
    record["command"] = cmd
    record["log"] = str(log_path)
    store(out, record)
    steps = record["steps_to_95"]
    print(f"[done]  {tag}: steps_to_95={steps} ({wall:.0f} s)", flush=True)
    return record


def store(out: Path, record: dict[str, Any]) -> Path:
    """Write a run record to ``out/runs``.

    Args:
        out: The benchmark's output directory.
        record: The run record (``name`` and ``seed`` included).

    Returns:
        The path written.
    """
    path = run_path(out, record["name"], int(record["seed"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
    return path


def load_summary(path: Path, name: str, seed: int) -> dict[str, Any]:
    """A run record from the example's ``grokking.json``.

    Args:
        path: The ``grokking.json`` written by the example.
        name: Config name.
        seed: Seed.

    Returns:
        The run record.
    """
    data = json.loads(path.read_text())
    return {
        "name": name,
        "seed": seed,
        "steps_to_95": data["steps_to_95"],
        "wall_s": None,
        "fit_s": data.get("fit_s"),
        "final_val_acc": data.get("final_val_acc"),
        "best_val_acc": data.get("best_val_acc"),
        "budget": data.get("budget"),
        "global_step": data.get("global_step"),
        "val_curve": data.get("val_curve", {"step": [], "acc": []}),
        "source": str(path),
    }


def load_metrics_csv(
    path: Path, name: str, seed: int, budget: Optional[int], threshold: float = 0.95
) -> dict[str, Any]:
    """A run record from a CSVLogger ``metrics.csv`` (for a run whose ``grokking.json`` is missing).

    Lightning logs a validation at the end of an epoch under ``step = global_step - 1``, so one is
    added to get the optimizer steps taken.

    Args:
        path: The ``metrics.csv``.
        name: Config name.
        seed: Seed.
        budget: The run's step budget.
        threshold: The validation accuracy that counts as generalized.

    Returns:
        The run record.
    """
    steps: list[int] = []
    accs: list[float] = []
    with path.open() as f:
        for row in csv.DictReader(f):
            if row.get("val_acc"):
                steps.append(int(row["step"]) + 1)
                accs.append(float(row["val_acc"]))
    reached = next((s for s, a in zip(steps, accs) if a >= threshold), None)
    return {
        "name": name,
        "seed": seed,
        "steps_to_95": reached,
        "wall_s": None,
        "fit_s": None,
        "final_val_acc": accs[-1] if accs else None,
        "best_val_acc": max(accs) if accs else None,
        "budget": budget,
        "global_step": steps[-1] if steps else None,
        "val_curve": {"step": steps, "acc": accs},
        "source": str(path),
    }


def import_run(out: Path, name: str, seed: int, source: Path, budget: Optional[int]) -> dict[str, Any]:
    """Store a run made directly with the example CLI as a benchmark run.

    Args:
        out: The benchmark's output directory.
        name: Config name it ran.
        seed: Its seed.
        source: Its log directory (holding ``grokking.json`` or ``metrics.csv``), its ``grokking.json``
            or a CSVLogger metrics file (the latter is read only if no ``grokking.json`` lies beside it).
        budget: Its step budget, used when only ``metrics.csv`` is there (``None``: the config's).

    Returns:
        The stored record.
    """
    if source.is_dir():
        summary, metrics = source / "grokking.json", source / "metrics.csv"
    elif source.suffix == ".json":
        summary, metrics = source, source.with_name("metrics.csv")
    else:  # a CSVLogger metrics file, under any name
        summary, metrics = source.with_name("grokking.json"), source
    if summary.exists():
        record = load_summary(summary, name, seed)
    elif metrics.exists():
        if budget is None:
            budget = config_budget(CONFIG_DIR / f"{name}.yaml")
        record = load_metrics_csv(metrics, name, seed, budget)
    else:
        raise FileNotFoundError(f"no grokking.json or metrics.csv at {source}")
    store(out, record)
    return record


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------


def load_runs(out: Path) -> list[dict[str, Any]]:
    """All stored runs.

    Args:
        out: The benchmark's output directory.

    Returns:
        The run records, sorted by name and seed.
    """
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    return sorted(records, key=lambda r: (r["name"], int(r["seed"])))


def _steps(record: dict[str, Any]) -> tuple[float, bool]:
    """``(steps, censored)``: a run's steps to 95%, or its budget (censored) when not reached."""
    if record.get("steps_to_95") is not None:
        return float(record["steps_to_95"]), False
    budget = record.get("budget") if record.get("budget") is not None else record.get("global_step")
    return float(budget or 0), True


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max of the steps to 95% of one config's runs.

    An unreached run counts as its budget. Then the median is a lower bound (``median_lower_bound``)
    whenever a censored run sits in the middle of the sorted list, and ``max`` whenever any run is
    censored.

    Args:
        records: The runs of one config.

    Returns:
        ``median_steps_to_95``, ``min``, ``max``, ``n_seeds``, ``n_reached``, ``median_lower_bound``,
        ``min_lower_bound``, ``max_lower_bound`` and ``seeds``.
    """
    values = sorted((_steps(r) for r in records), key=lambda v: (v[0], v[1]))
    n = len(values)
    if n == 0:
        raise ValueError("no runs to summarize")
    middle = [values[(n - 1) // 2], values[n // 2]]
    return {
        "median_steps_to_95": statistics.median(v for v, _ in values),
        "median_lower_bound": any(c for _, c in middle),
        "min": values[0][0],
        "min_lower_bound": values[0][1],
        "max": values[-1][0],
        "max_lower_bound": any(c for _, c in values),
        "n_seeds": n,
        "n_reached": sum(1 for _, c in values if not c),
        "seeds": sorted(int(r["seed"]) for r in records),
    }


def speedup(reference: Optional[dict[str, Any]], target: dict[str, Any]) -> tuple[Optional[float], str]:
    """Speed-up of ``target`` over ``reference``: reference median steps / target median steps.

    Args:
        reference: The reference config's summary (``None`` if it was not run).
        target: The config's summary.

    Returns:
        ``(value, bound)`` with bound ``"exact"``; ``"lower"`` when the reference's median is a lower
        bound (the true speed-up is at least the value); ``"upper"`` when the target's median is a
        lower bound (the true speed-up is at most the value); ``"unknown"`` when both are (value
        ``None``); ``"missing"`` without a reference.
    """
    if reference is None:
        return None, "missing"
    ref_censored, tgt_censored = reference["median_lower_bound"], target["median_lower_bound"]
    if ref_censored and tgt_censored:
        return None, "unknown"
    if target["median_steps_to_95"] <= 0:
        return None, "unknown"
    value = reference["median_steps_to_95"] / target["median_steps_to_95"]
    if ref_censored:
        return value, "lower"
    if tgt_censored:
        return value, "upper"
    return value, "exact"


def aggregate(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Build the content of ``results.json`` from run records.

    Args:
        records: The run records (from ``OUT/runs``).

    Returns:
        ``{"runs": [...], "summary": {name: ...}, "speedup": {name: ...}}``.
    """
    names = order_names([r["name"] for r in records])
    summary = {name: summarize([r for r in records if r["name"] == name]) for name in names}
    speedups: dict[str, Any] = {}
    for name in names:
        entry: dict[str, Any] = {}
        bounds: dict[str, str] = {}
        for ref in REFERENCES:
            # a config against itself is 1x by definition, even when it never reached 95%
            value, bound = (1.0, "exact") if ref == name else speedup(summary.get(ref), summary[name])
            entry[f"vs_{ref}"] = value
            bounds[f"vs_{ref}"] = bound
        entry["lower_bound"] = any(b == "lower" for b in bounds.values())
        entry["upper_bound"] = any(b == "upper" for b in bounds.values())
        entry["bounds"] = bounds
        speedups[name] = entry
    runs = [
        {key: r.get(key) for key in RESULT_KEYS}
        for r in sorted(records, key=lambda r: (names.index(r["name"]), int(r["seed"])))
    ]
    return {"runs": runs, "summary": summary, "speedup": speedups}


def _fmt_steps(value: float, bound: bool) -> str:
    return f"> {value:,.0f}" if bound else f"{value:,.0f}"


def _fmt_speedup(value: Optional[float], bound: str) -> str:
    if bound == "missing":
        return "n/a"
    if value is None:
        return "?"
    prefix = {"lower": ">= ", "upper": "<= "}.get(bound, "")
    return f"{prefix}{value:.1f}x"


def markdown_table(results: dict[str, Any]) -> str:
    """The results as a markdown table.

    Args:
        results: The content of ``results.json``.

    Returns:
        The table.
    """
    lines = [
        "| config | seeds (reached) | median steps to 95% | spread (min - max)"
        " | speed-up vs baseline | speed-up vs weight decay |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in results["summary"].items():
        sp = results["speedup"][name]
        spread = f"{_fmt_steps(s['min'], s['min_lower_bound'])} - {_fmt_steps(s['max'], s['max_lower_bound'])}"
        median = _fmt_steps(s["median_steps_to_95"], s["median_lower_bound"])
        lines.append(
            f"| {name} | {s['n_seeds']} ({s['n_reached']}) | {median}"
            f" | {spread} | {_fmt_speedup(sp['vs_baseline'], sp['bounds']['vs_baseline'])}"
            f" | {_fmt_speedup(sp['vs_weight_decay'], sp['bounds']['vs_weight_decay'])} |"
        )
    lines.append("")
    lines.append(
        "'> N': not reached within the budget N. Speed-up = reference median / config median;"
        " '>= x' where the reference did not reach 95% (a lower bound),"
        " '<= x' where the config did not (an upper bound)."
    )
    return "\n".join(lines)


def plot(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Overlay the validation accuracy curves of all runs (log x axis, one colour per config).

    Args:
        records: The run records with their ``val_curve``.
        path: The PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = order_names([r["name"] for r in records])
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(names):
        for j, r in enumerate(r for r in records if r["name"] == name):
            curve = r.get("val_curve") or {}
            points = [(s, a) for s, a in zip(curve.get("step", []), curve.get("acc", [])) if s > 0]
            if not points:
                continue
            ax.plot(*zip(*points), color=colours(i % 10), linewidth=1.0, alpha=0.8, label=name if j == 0 else None)
    ax.axhline(0.95, color="gray", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("optimization step")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("x*y mod 97: validation accuracy (all seeds)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: Path, make_plot: bool = True) -> dict[str, Any]:
    """Rebuild ``results.json`` (and ``val_acc.png``) from ``out/runs`` and print the table.

    Args:
        out: The benchmark's output directory.
        make_plot: Whether to write the plot.

    Returns:
        The results.
    """
    records = load_runs(out)
    if not records:
        raise SystemExit(f"no runs in {out / 'runs'}")
    results = aggregate(records)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(markdown_table(results))
    print(f"\nresults: {out / 'results.json'}")
    if make_plot:
        plot(records, out / "val_acc.png")
        print(f"plot: {out / 'val_acc.png'}")
    return results


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line.

    Args:
        argv: Arguments (``None``: ``sys.argv``).

    Returns:
        The parsed arguments.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (runs/, logs/, results.json)")
    parser.add_argument(
        "--budget", type=int, default=None, help="step budget per run (default: the config's max_steps)"
    )
    parser.add_argument("--seeds", type=int, default=1, help="run seeds 0..N-1 (default 1)")
    parser.add_argument("--configs", nargs="+", default=None, help="config names (YAML stems; default all)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, one torch thread each (default 1)")
    parser.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE", help="extra CLI override, e.g. data.p=11"
    )
    parser.add_argument("--report-only", action="store_true", help="only rebuild results.json and the plot")
    parser.add_argument(
        "--import-run",
        nargs=3,
        metavar=("NAME", "SEED", "LOG_DIR"),
        help="store a run made with the example CLI (its log dir with grokking.json or metrics.csv), then report",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write val_acc.png")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        parser.error("--seeds and --jobs must be at least 1")
    if args.budget is not None and args.budget < 1:
        parser.error("--budget must be positive")
    known = available_configs()
    for name in args.configs or []:
        if name not in known:
            parser.error(f"unknown config {name!r}; choose from {', '.join(known)}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark.

    Args:
        argv: Arguments (``None``: ``sys.argv``).

    Returns:
        The exit code (1 when a run failed).
    """
    args = parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.import_run:
        name, seed, source = args.import_run
        record = import_run(out, name, int(seed), Path(source), args.budget)
        print(f"imported {name}-seed{seed}: steps_to_95={record['steps_to_95']}")
        report(out, make_plot=not args.no_plot)
        return 0
    if args.report_only:
        report(out, make_plot=not args.no_plot)
        return 0
    names = order_names(args.configs or available_configs())
    todo = [
        (name, seed)
        for seed in range(args.seeds)
        for name in names
        if not is_done(run_path(out, name, seed), args.budget)
    ]
    skipped = len(names) * args.seeds - len(todo)
    if skipped:
        print(f"{skipped} run(s) already in {out / 'runs'}, skipped")
    failed = 0
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, out, name, seed, args.budget, args.override) for name, seed in todo]
        for future in futures:
            if future.result() is None:
                failed += 1
    if load_runs(out):
        report(out, make_plot=not args.no_plot)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

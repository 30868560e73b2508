"""Smoke test of ``benchmarks/overhead.py``: a ``--quick`` run produces a complete, sane report.

No timing is asserted (timings on shared machines are noise); only that every expected row is there,
every number is positive and finite, and the exactly predictable numbers (state bytes) are exact.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"

EMA_KEYS = {"ema", "ema_nocheck", "ema_loop", "ema_stats", "authors_ema"}
COMMON_KEYS = {"floor", "adamw"}
MA_FULL = {"ma10", "ma10_loop", "ma10_stats", "ma100", "authors_ma10", "authors_ma100"}
EXPECTED_VARIANTS = {
    "example": EMA_KEYS | COMMON_KEYS | MA_FULL | {"train", "train_ema"},
    "many-small": EMA_KEYS | COMMON_KEYS | MA_FULL,
    "large": EMA_KEYS | COMMON_KEYS | {"ma10", "authors_ma10"},
    "large-ma": EMA_KEYS | COMMON_KEYS | MA_FULL,
}
# state bytes / parameter bytes: EMA one copy; MA the window plus the running sum (ours), the window (authors')
EXPECTED_STATE = {"ema": 1, "authors_ema": 1, "ma10": 11, "authors_ma10": 10, "ma100": 101, "authors_ma100": 100}


def load_overhead() -> ModuleType:
    """Import the benchmark script as a module."""
    name = "benchmarks_overhead_under_test"
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def overhead() -> ModuleType:
    return load_overhead()


@pytest.fixture(scope="module")
def quick_run(overhead: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, dict]:
    """One ``--quick --no-rss`` run of all models: (returned data, printed text, JSON written)."""
    out = tmp_path_factory.mktemp("bench") / "overhead.json"
    data = overhead.main(["--quick", "--no-rss", "--json", str(out)])
    return data, data["report"], json.loads(out.read_text())


def positive_finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_json_matches_return_and_records_machine_and_settings(quick_run: tuple[dict, str, dict]) -> None:
    data, _, saved = quick_run
    assert saved["targets"] == data["targets"]
    assert saved["settings"]["quick"] is True
    assert saved["settings"]["repeats"] == 3
    for key in ("platform", "torch", "torch_threads", "cpu_model", "cpu_count", "device"):
        assert saved["machine"][key], key
    assert saved["peak_rss"] is None


def test_every_model_has_every_variant_with_positive_finite_times(quick_run: tuple[dict, str, dict]) -> None:
    _, _, saved = quick_run
    assert set(saved["models"]) == set(EXPECTED_VARIANTS)
    for key, model in saved["models"].items():
        for field in ("medians_ms", "means_ms", "medians_wall_ms", "medians_cpu_ms"):
            assert set(model[field]) == EXPECTED_VARIANTS[key], (key, field)
            bad = {k: v for k, v in model[field].items() if not positive_finite(v)}
            assert not bad, (key, field, bad)
        # --quick: 3 interleaved rounds, the authors' MA loops capped at 2 (--slow-repeats)
        expected_samples = {k: 2 if k.startswith("authors_ma") else 3 for k in EXPECTED_VARIANTS[key]}
        assert model["num_samples"] == expected_samples, key
        assert model["skipped_steps"] == 0, "the gradients must stay finite, or the EMA/MA work is skipped"


def test_ratios_are_present_where_both_variants_ran(overhead: ModuleType, quick_run: tuple[dict, str, dict]) -> None:
    _, text, saved = quick_run
    for key, model in saved["models"].items():
        for label, a, b in overhead.RATIOS:
            value = model["ratios"][label]
            if a in EXPECTED_VARIANTS[key] and b in EXPECTED_VARIANTS[key]:
                assert positive_finite(value), (key, label, value)
                assert label in text
            else:
                assert value is None, (key, label)


def test_state_bytes_are_exact_multiples_of_the_parameters(quick_run: tuple[dict, str, dict]) -> None:
    _, _, saved = quick_run
    for key, model in saved["models"].items():
        ratios = model["state_over_param_bytes"]
        expected = {k: v for k, v in EXPECTED_STATE.items() if k in EXPECTED_VARIANTS[key]}
        assert ratios == pytest.approx(expected), key


def test_report_has_every_section_and_judges_every_target(quick_run: tuple[dict, str, dict]) -> None:
    _, text, saved = quick_run
    for heading in ("## Ratios", "## Targets", "## Medians", "## Filter state"):
        assert heading in text
    targets = saved["targets"]
    assert {t["target"] for t in targets} == {
        "EMA >= 3x faster than the authors' EMA loop",
        "EMA within 1.5x of the floor",
        "MA w100 within 1.3x of MA w10",
        "MA w100 >= 20x faster than the authors' MA w100",
        "EMA < 3% of the example's training step",
    }
    for t in targets:
        assert positive_finite(t["value"]), t
        assert t["met"] in (True, False), t
        assert ("met" if t["met"] else "MISSED") in text


def test_peak_rss_subprocesses_report_memory(overhead: ModuleType) -> None:
    args = overhead.parse_args(["--quick", "--rss-variants", "none", "ma"])
    records = overhead.measure_rss(args)
    assert [r["variant"] for r in records] == ["none", "ma"]
    for r in records:
        assert positive_finite(r["rss_before_training_bytes"])
        assert r["peak_rss_bytes"] >= r["rss_before_training_bytes"] * 0.9
    none, ma = records
    assert none["state_bytes"] == 0
    assert ma["state_bytes"] == (args.rss_window + 1) * ma["param_bytes"]
    text = overhead.report({}, [], records)
    assert "## Peak RSS" in text and "MA (ours)" in text

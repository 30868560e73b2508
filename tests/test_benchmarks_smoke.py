"""Smoke test of ``benchmarks/overhead.py``: a ``--quick`` run prints every section with sane numbers and its JSON
holds every case. No time is asserted (timings on shared machines are noise), only that the numbers exist, are
positive and finite, and that the state bytes are the exact multiples the filters promise."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"
SHAPES = {"many-small", "transformer", "wide-mlp"}
PEERS = ("pytorch_optimizer", "grokfast_pytorch")
OURS_VS_AUTHORS = [f"{f} ({who})" for f in ("EMA", "MA w10", "MA w100") for who in ("ours", "authors'")]
ORTHOGRAD = ["OrthoGrad (ours, foreach)", "OrthoGrad (ours, foreach=False)", "OrthoGrad reference loop"]
PEER_ROWS = ["pytorch_optimizer OrthoGrad", "pytorch_optimizer OrthoGrad foreach=True", "EMA + AdamW step (ours)"]
PEER_ROWS += ["pytorch_optimizer GrokFastAdamW", "pytorch_optimizer GrokFastAdamW foreach=True"]
TIMED = {  # section: (rows timed, columns)
    "authors": (OURS_VS_AUTHORS, SHAPES),
    "floor": (["EMA (ours)", "floor"], SHAPES),
    "adamw": (["EMA (ours)", "MA w10 (ours)", "OrthoGrad (ours, foreach)", "AdamW step"], SHAPES),
    "train": (["training step", "EMA step"], {"transformer, batch 64"}),
    "stats": (["step()", "compute_stats=True"], SHAPES),
    "bf16": (["fp32_state=True", "fp32_state=False"], SHAPES),
    "orthograd": ([*ORTHOGRAD, *PEER_ROWS, "grokfast_pytorch GrokFastAdamW"], SHAPES),
}
# state bytes / parameter bytes: EMA one copy; MA the window plus the running sum (ours), the window (authors')
STATE = {"EMA (ours)": 1, "MA w10 (ours)": 11, "MA w100 (ours)": 101}
STATE |= {"EMA (authors')": 1, "MA w10 (authors')": 10, "MA w100 (authors')": 100}


def positive_finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_run_prints_every_section_and_records_every_case(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("benchmarks_overhead_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    overhead = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(overhead)
    out = tmp_path / "overhead.json"
    returned = overhead.main(["--quick", "--json", str(out)])
    text, data = capsys.readouterr().out, json.loads(out.read_text())
    assert data == json.loads(json.dumps(returned))
    assert data["settings"]["quick"] is True and data["machine"]["threads"] == 1
    assert "WARNING" not in text, "a filter skipped steps for inf/NaN gradients: its timings are invalid"
    lines = text.splitlines()
    assert set(data["sections"]) == {*TIMED, "window", "memory"}
    for key, section in data["sections"].items():
        assert f"== {section['title']} ==" in text, key
        rows, cols = TIMED.get(key, ([], set()))
        if rows:  # the Compare table: its label in a "[---- label ----]" banner, and a line per row
            assert any(ln.startswith("[") and section["title"] in ln for ln in lines), key
        assert list(section["medians_s"]) == rows, key
        for row, values in section["medians_s"].items():
            assert set(values) == cols, (key, row)
            for value in values.values():
                if value is None:  # an optional peer, then reported as not installed
                    assert row.startswith(PEERS) and row in data["not_installed"], (key, row)
                else:
                    assert positive_finite(value), (key, row, value)
                    assert any(ln.strip().startswith(f"{row}  ") for ln in lines), (key, row)
        assert section["ratios"], key
        for name, values in section["ratios"].items():  # the ratio table: the JSON's numbers, printed
            line = next(ln for ln in lines if ln.startswith(f"  {name}  "))
            cells = line[len(name) + 2 :].split()
            assert len(cells) == len(values) == (len(cols) if cols else len(SHAPES)), (key, name, cells)
            for cell, value in zip(cells, values.values()):
                if value is None:
                    assert cell == "not-installed" and any(p in name for p in PEERS), (key, name)
                else:
                    assert positive_finite(value) and positive_finite(float(cell)), (key, name, cell)
                    assert float(cell) == pytest.approx(value, rel=5e-3), (key, name, cell)
    memory = data["sections"]["memory"]["ratios"]
    assert memory == {row: {c: pytest.approx(multiple) for c in SHAPES} for row, multiple in STATE.items()}
    bf16 = data["sections"]["bf16"]["ratios"]
    for fp32, multiple in ((True, 2), (False, 1)):  # a float32 state is twice the bfloat16 parameters
        for what in ("state_bytes", "expected_state_bytes"):
            assert bf16[f"{what} / param bytes, fp32_state={fp32}"] == {c: multiple for c in SHAPES}

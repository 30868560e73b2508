"""Sharded training: both callbacks under ``ModelParallelStrategy`` on two CPU processes (FSDP2, and tensor parallel on
a 2-D mesh), the plain transforms in a Fabric loop over an FSDP2 model; each equal to one process over the same global
batches, resumed exactly from both checkpoint forms and on another number of processes.

The runs are ``tests/scripts/sharded_train.py`` in subprocesses (the strategy's launcher re-executes the script it runs
in); the one-process references run here, on the same model unsharded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import assert_state_equal
from sharded_train import SAVED, STEPS, Logged, Sharded, both, callback, plain_loop

SCRIPT = Path(__file__).parent / "scripts" / "sharded_train.py"
KINDS = ("ema", "ma", "orthograd")
close = {"rtol": 1e-5, "atol": 1e-6}  # float32 sums in another order
README_SHARDED = "--trainer.devices 2 --trainer.strategy ModelParallelStrategy --trainer.strategy.data_parallel_size 2 "
README_SHARDED += "--trainer.strategy.tensor_parallel_size 1"


def launch(*args: Any, cwd: Any = None) -> subprocess.CompletedProcess[str]:
    """Run a script in a clean environment (no rendezvous variables an earlier in-process run left behind)."""
    drop = ("MASTER_", "PL_", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "GROUP_RANK")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)} | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def load(out: Path, job: str, rank: int = 0) -> dict[str, Any]:
    return torch.load(out / job / f"rank{rank}.pt", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    jobs = ["ema:ema:full-dcp", "ma:ma:full-file", "orthograd:orthograd:full", "nan:ema:nan"]
    launch(SCRIPT, out, 2, "fsdp", *jobs, "ema-resumed:ema:resume-ema", "ma-resumed:ma:resume-ma")
    launch(SCRIPT, out, 1, "fsdp", "one:ema:resume-ema")  # the 2-process checkpoint on 1 process
    launch(SCRIPT, out / "tp", 2, "tp", *(f"{k}:{k}:full" for k in KINDS))
    launch(SCRIPT, out, 2, "fabric")
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """One process, the model unsharded, each transform's callback: weights, state dict and logged values."""
    out = {}
    for kind in KINDS:
        transform, logged, model = callback(kind), Logged(), Sharded()
        L.seed_everything(0, verbose=False)
        L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, callbacks=[transform, logged], log_every_n_steps=1,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  logger=L.pytorch.loggers.CSVLogger(tmp_path_factory.mktemp(kind))).fit(model)  # fmt: skip
        out[kind] = {"model": model.net.state_dict(), "state": transform.state_dict(), "logged": logged.steps,
                     "state_bytes": transform.transform.state_bytes()}  # fmt: skip
    return out


def equal_ranks(out: Path, job: str) -> dict[str, Any]:
    """Rank 0's result, after checking that rank 1 ends with the same weights, state, logged values and skips."""
    rank0, rank1 = load(out, job), load(out, job, 1)
    same = ("model", "state", "logged", "skipped", "step")
    assert_state_equal({k: rank0[k] for k in same}, {k: rank1[k] for k in same}, equal_nan=True)
    return rank0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["fsdp", "tp"])
def test_each_transform_on_the_pieces_equals_one_process(runs: Path, single: Any, layout: str, kind: str) -> None:
    """Every rank ends with the weights, the (gathered) state and the logged diagnostics of one process over the
    same global batches; under FSDP2 each rank keeps only its pieces of the state, together the whole."""
    out = runs if layout == "fsdp" else runs / "tp"
    sharded, one = equal_ranks(out, kind), single[kind]
    assert sharded["step"] == STEPS and sharded["skipped"] == 0
    assert_state_equal(sharded["model"], one["model"], **close)
    assert_state_equal(sharded["state"], one["state"], **close)
    assert sharded["logged"].keys() == one["logged"].keys() and sharded["logged"][STEPS - 1]
    assert_state_equal(sharded["logged"], one["logged"], rtol=1e-5, atol=1e-7, equal_nan=True)  # NaN: MA's warm-up
    if layout == "fsdp" and kind != "orthograd":
        pieces = [load(out, kind, r)["state_bytes"] for r in (0, 1)]
        assert sum(pieces) == one["state_bytes"] and max(pieces) < one["state_bytes"], pieces


def test_resume_from_a_distributed_or_a_full_checkpoint_ends_where_the_uninterrupted_run_ends(runs: Path) -> None:
    """Resumed from the checkpoint of step 8 of 12, distributed (EMA) or one file (MA), every rank sees the batches
    the uninterrupted run saw from there and ends bit for bit where it ends. Resumed on one process, the state is
    re-sharded to it: it holds all of it and ends where the two processes end."""
    for kind in ("ema", "ma"):
        resumed, straight = equal_ranks(runs, f"{kind}-resumed"), equal_ranks(runs, kind)
        assert resumed["seen"] == straight["seen"][SAVED:]
        assert_state_equal(*({k: run[k] for k in ("model", "state", "step")} for run in (resumed, straight)))
    one, straight = load(runs, "one"), load(runs, "ema")
    assert [i for i, _ in one["seen"]] == [i for i, _ in straight["seen"][SAVED:]]  # the same batches, whole
    assert one["state_bytes"] == sum(load(runs, "ema", r)["state_bytes"] for r in (0, 1))
    assert_state_equal((one["model"], one["state"]), (straight["model"], straight["state"]), **close)


def test_a_nonfinite_piece_on_one_rank_skips_the_step_on_every_rank(runs: Path) -> None:
    """The NaN is in rank 1's rows of a gradient: both ranks skip the step (and, the optimizer having stepped on it,
    every later one), count and log the same, and keep a finite state."""
    nan = equal_ranks(runs, "nan")
    assert nan["skipped"] == STEPS - 5
    assert [nan["logged"][k]["grokfast/skipped_steps"] for k in range(STEPS)] == [0.0] * 5 + list(range(1, 8))
    assert all(torch.isfinite(t).all() for entry in nan["state"]["filter"]["state"].values() for t in entry.values())


def test_the_plain_transforms_in_a_fabric_loop_over_fsdp2_equal_one_process(runs: Path) -> None:
    """``EMAFilter`` then ``OrthoGrad``, ``step(optimizer=...)`` after ``fabric.backward``, on two processes each with
    half of every batch: the weights and the EMA state of the same loop on one process. The filter's state dict, of
    DTensors, goes through ``torch.distributed.checkpoint`` and into a new filter unchanged."""
    model = Sharded()

    def step(loss: torch.Tensor, optimizer: Any, made: Any) -> None:
        loss.backward()
        for transform in made:
            transform.step()

    ema = plain_loop(model, step, both)[0]
    for rank in (0, 1):
        fabric = torch.load(runs / f"fabric{rank}.pt", weights_only=True)
        assert_state_equal((fabric["model"], fabric["state"]), (model.net.state_dict(), ema.state_dict()), **close)
        # its state_dict() of DTensors round-trips through torch.distributed.checkpoint, and loads into a new filter
        assert_state_equal(fabric["dcp"], fabric["state"])
        assert_state_equal(fabric["loaded"], fabric["state"])


def test_the_readme_command_trains_the_example_sharded(tmp_path: Path) -> None:
    """The modular-arithmetic example with Grokfast-EMA on two CPU processes under ModelParallelStrategy, as the
    README gives it (a tiny model): it shards itself, trains, validates and reports on rank 0 (every rank takes part
    in Lightning's collectives up to the end)."""
    example = Path(__file__).resolve().parents[1] / "examples" / "modular_arithmetic.py"
    readme = (example.parents[1] / "README.md").read_text()
    assert f"--config examples/configs/grokfast_ema.yaml {README_SHARDED}" in readme
    args = ["fit", "--config", str(example.parent / "configs" / "grokfast_ema.yaml"), *README_SHARDED.split()]
    args += ["--trainer.max_steps", "6", "--trainer.default_root_dir", str(tmp_path), "--data.p", "11"]
    run = launch(example, *args, "--model.width", "16", "--model.heads", "2", cwd=tmp_path)
    assert "steps_to_95:" in run.stdout and "(this rank's pieces)" in run.stderr + run.stdout
    assert len(list(tmp_path.glob("csv/version_*/grokking.json"))) == 1

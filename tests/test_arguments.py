"""Bad input is refused up front, with an error naming the argument, the value and what is accepted."""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
import torch

from lightning_grokfast import EMAFilter, GrokfastCallback, MAFilter

BAD_CALLBACK_ARGS = [
    ("filter", "sma", r"`filter` must be one of 'ema', 'ma', got 'sma'"),
    ("filter", None, r"`filter` must be one of"),
    ("alpha", 1.0, r"`alpha` must be a number in \[0, 1\).*got 1\.0"),
    ("alpha", -0.1, r"`alpha` must be a number in \[0, 1\).*got -0\.1"),
    ("alpha", math.nan, r"`alpha` must be a number in \[0, 1\).*got nan"),
    ("alpha", "0.9", r"`alpha` must be a number in \[0, 1\).*got '0\.9'"),
    ("alpha", True, r"`alpha` must be a number"),
    ("lamb", -1.0, r"`lamb` must be a finite number >= 0.*got -1\.0"),
    ("lamb", math.inf, r"`lamb` must be a finite number >= 0.*got inf"),
    ("lamb", math.nan, r"`lamb` must be a finite number >= 0.*got nan"),
    ("lamb", "2", r"`lamb` must be a finite number"),
    ("window_size", 0, r"`window_size` must be an integer >= 1, got 0"),
    ("window_size", 2.5, r"`window_size` must be an integer >= 1, got 2\.5"),
    ("window_size", True, r"`window_size` must be an integer >= 1, got True"),
    ("warmup", "yes", r"`warmup` must be True or False, got 'yes'"),
    ("reduction", "median", r"`reduction` must be one of 'mean', 'sum', got 'median'"),
    ("log_diagnostics", 1, r"`log_diagnostics` must be True or False, got 1"),
    ("skip_nonfinite", None, r"`skip_nonfinite` must be True or False, got None"),
    ("foreach", "auto", r"`foreach` must be True, False or None, got 'auto'"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD_CALLBACK_ARGS)
def test_callback_rejects_bad_argument(name: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GrokfastCallback(**{name: value})


def test_every_callback_argument_is_checked() -> None:
    checked = {name for name, _, _ in BAD_CALLBACK_ARGS}
    assert checked == set(inspect.signature(GrokfastCallback).parameters)


def test_every_callback_argument_is_typed_and_documented() -> None:
    """LightningCLI builds its parser and --help from the type hints and the ``Args:`` docstring."""
    doc = inspect.getdoc(GrokfastCallback) or ""
    for name, param in inspect.signature(GrokfastCallback).parameters.items():
        assert param.annotation is not inspect.Parameter.empty, name
        assert f"    {name}: " in doc, f"{name} missing from the Args: section"


def test_lamb_defaults_follow_the_filter() -> None:
    assert GrokfastCallback().lamb == 2.0
    assert GrokfastCallback(filter="ma").lamb == 5.0
    assert GrokfastCallback(filter="ma", lamb=0.0).lamb == 0.0


def test_callback_accepts_the_edges_of_each_range() -> None:
    cb = GrokfastCallback(alpha=0, lamb=0, window_size=1, foreach=False)
    assert (cb.alpha, cb.lamb, cb.window_size) == (0.0, 0.0, 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.5}, r"`alpha`"),
        ({"lamb": -2.0}, r"`lamb`"),
        ({"skip_nonfinite": "no"}, r"`skip_nonfinite`"),
        ({"foreach": 0}, r"`foreach`"),
    ],
)
def test_ema_filter_rejects_bad_argument(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EMAFilter([torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window_size": 0}, r"`window_size`"),
        ({"lamb": math.inf}, r"`lamb`"),
        ({"warmup": None}, r"`warmup`"),
        ({"reduction": "max"}, r"`reduction`"),
    ],
)
def test_ma_filter_rejects_bad_argument(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MAFilter([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_filter_rejects_bad_params() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="`params` is empty"):
        EMAFilter([])
    with pytest.raises(ValueError, match="not a mix"):
        EMAFilter([p, ("b", torch.nn.Parameter(torch.zeros(1)))])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="names 'a' twice"):
        EMAFilter([("a", p), ("a", torch.nn.Parameter(torch.zeros(1)))])
    with pytest.raises(ValueError, match="must hold tensors"):
        EMAFilter([("a", 3.0)])  # type: ignore[list-item]


def test_step_rejects_unregistered_and_sparse() -> None:
    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    f = EMAFilter([("p", p)])
    q.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"shape \(3,\).*not registered"):
        f.step([q])
    emb = torch.nn.Embedding(5, 2, sparse=True)
    g = EMAFilter(emb.named_parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="'weight' has a sparse gradient"):
        g.step()

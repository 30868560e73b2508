"""lightning-grokfast: gradient transforms that make grokking arrive sooner, as PyTorch Lightning callbacks.

Grokfast (Lee, Kang, Kim, Lee 2024, arXiv 2405.20233) amplifies the slow component of every gradient; ⊥Grad
(Prieto et al. 2025, arXiv 2501.04697) removes the component of every gradient along its own weight.

The transforms are plain PyTorch; the callbacks, which need Lightning, are imported on first use, so that
``from lightning_grokfast import EMAFilter`` does not import Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning_grokfast.filters import EMAFilter, FilterStats, GradientFilter, MAFilter
from lightning_grokfast.orthograd import OrthoGrad, OrthoGradStats
from lightning_grokfast.settings import EMASettings, MASettings, OrthoGradSettings
from lightning_grokfast.transform import GradientTransform

if TYPE_CHECKING:
    from lightning_grokfast.callback import GrokfastCallback, OrthoGradCallback

__version__ = "0.3.0.dev0"
__all__ = [
    "EMAFilter",
    "EMASettings",
    "FilterStats",
    "GradientFilter",
    "GradientTransform",
    "GrokfastCallback",
    "MAFilter",
    "MASettings",
    "OrthoGrad",
    "OrthoGradCallback",
    "OrthoGradSettings",
    "OrthoGradStats",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in ("GrokfastCallback", "OrthoGradCallback"):
        from lightning_grokfast import callback

        return getattr(callback, name)
    raise AttributeError(f"module 'lightning_grokfast' has no attribute {name!r}")

"""lightning-grokfast: gradient transforms that make grokking arrive sooner, as PyTorch Lightning callbacks.

Grokfast (Lee, Kang, Kim, Lee 2024, arXiv 2405.20233) amplifies the slow component of every gradient; ⊥Grad
(Prieto et al. 2025, arXiv 2501.04697) removes the component of every gradient along its own weight.
"""

from __future__ import annotations

from lightning_grokfast.callback import GrokfastCallback, OrthoGradCallback
from lightning_grokfast.filters import EMAFilter, FilterStats, GradientFilter, MAFilter
from lightning_grokfast.orthograd import OrthoGrad, OrthoGradStats

__version__ = "0.2.0"
__all__ = [
    "EMAFilter",
    "FilterStats",
    "GradientFilter",
    "GrokfastCallback",
    "MAFilter",
    "OrthoGrad",
    "OrthoGradCallback",
    "OrthoGradStats",
    "__version__",
]

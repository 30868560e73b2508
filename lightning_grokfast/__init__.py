"""lightning-grokfast: Grokfast gradient filters and a PyTorch Lightning callback.

Grokfast (Lee, Kang, Kim, Lee 2024, arXiv 2405.20233) amplifies the slow component of every gradient
so that grokking arrives much sooner.
"""

from __future__ import annotations

from lightning_grokfast.callback import GrokfastCallback
from lightning_grokfast.filters import EMAFilter, FilterStats, GradientFilter, MAFilter

__version__ = "0.1.0"
__all__ = ["EMAFilter", "FilterStats", "GradientFilter", "GrokfastCallback", "MAFilter", "__version__"]

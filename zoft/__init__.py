"""zoft: zeroth-order fine-tuning of language models with forward passes only."""

__version__ = "0.1.0"

from zoft.errors import ZoftError
from zoft.optimizer import ZOOptimizer, build_optimizer, mezo
from zoft.perturb import perturbed_rows

__all__ = ["ZOOptimizer", "ZoftError", "build_optimizer", "mezo", "perturbed_rows", "__version__"]

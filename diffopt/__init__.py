"""diffopt: one line to make a diffusers pipeline as fast as PyTorch 2 allows, one line to take it back.

Example::

    import diffopt
    report = diffopt.optimize(pipe)   # SDPA processors + channels_last + torch.compile, in place
    print(report)
    diffopt.restore(pipe)             # everything undone

Importing this package changes nothing global: no torch, dynamo or inductor setting is written, and no
GPU is probed, until :func:`optimize` runs.
"""
from .api import optimize, restore, wait_until_compiled
from .capabilities import UnsupportedFeatureError
from .config import DeepCache, FirstBlockCache, OptimizeConfig
from .fidelity import quantization_error
from .report import Report

__version__ = "0.1.0"
__all__ = [
    "optimize", "restore", "OptimizeConfig", "DeepCache", "FirstBlockCache", "Report", "UnsupportedFeatureError",
    "quantization_error", "wait_until_compiled", "__version__",
]  # fmt: skip

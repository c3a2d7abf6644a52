"""Silence the third-party warnings a diffopt user cannot act on, for the length of a command.

Used by the entry points that print for a user (``diffopt bench``, ``diffopt env``, ``examples/quickstart.py``),
never at ``import diffopt``: a library must leave warnings and logging as the application set them. Each filter
matches one message, so any other warning of the same packages still shows.

Example::

    from diffopt.quiet import quiet_third_party

    with quiet_third_party():
        diffopt.optimize(pipe)
"""
from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

#: logger name -> messages (regular expressions, matched from the start) dropped from that logger.
LOGGED = {
    # torchao's wheels carry CUDA kernels (_C_mxfp8, _C_cutlass_90a) that a CPU-only torch cannot load.
    "torchao": [r"Failed to load .*_C\w*\..*so"],
    # torchao registers enums with pytree, which torch now handles itself and warns about.
    "torch.utils._pytree": [r".* is an Enum subclass and is now natively supported by torch\.compile"],
    # diffusers' torchao quantizer looks for tensor classes a recent torchao no longer has.
    "diffusers.quantizers.torchao.torchao_quantizer": [r"Unable to import `torchao` Tensor objects"],
    # Without torchvision, transformers hands out the PIL image processors of the pipelines' CLIP and SigLIP
    # feature extractors and says so; the images diffopt times never go through them.
    "transformers.utils.import_utils": [r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back"],
}

#: (category, message) of warnings.warn calls dropped. DeepFloyd IF's stage II hands the stage-I image, in
#: [-1, 1] as IF produces it, to diffusers' image processor, which asks for [0, 1]: the pipeline's own doing.
WARNED = [(FutureWarning, r"Passing `image` as torch tensor with value range in \[-1,1\] is deprecated")]


class _DropMessages(logging.Filter):
    def __init__(self, patterns: list[str]):
        super().__init__()
        self.patterns = [re.compile(pattern) for pattern in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.match(message) for pattern in self.patterns)


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """While the block runs, drop the messages of :data:`LOGGED` and :data:`WARNED`; everything else shows."""
    added = [(logging.getLogger(name), _DropMessages(patterns)) for name, patterns in LOGGED.items()]
    for logger, drop in added:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for category, message in WARNED:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger, drop in added:
            logger.removeFilter(drop)

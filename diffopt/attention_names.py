"""The values of ``attention=``, one row each: the single table every other list of attention names is derived from
(``config.ATTENTION_CHOICES``, the processor families, the kernels forced with ``sdpa_kernel``, diffusers'
dispatcher names, the capability gates). Plain Python: config imports it, and config must import without torch.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple


class AttentionName(NamedTuple):
    #: The value of ``attention=``.
    name: str
    #: The processor family direct layers (processors that call SDPA themselves) are put on: "sdpa", "default" or
    #: "xformers". None: the backend exists only behind diffusers' dispatcher, and no processor of ours reaches it.
    family: Optional[str]
    #: The member of torch's ``SDPBackend`` forced on direct layers with ``sdpa_kernel``; None forces no kernel.
    kernel: Optional[str]
    #: diffusers' attention-dispatcher backend for the same choice; None: dispatcher layers are left alone.
    dispatcher: Optional[str]


#: In the order ``ATTENTION_CHOICES`` lists them (error messages and docs show that order). "flash" is torch's
#: FlashAttention kernel on both kinds of layers, not diffusers' "flash" (the flash-attn package). "default" has
#: no dispatcher twin.
TABLE: Tuple[AttentionName, ...] = (
    AttentionName("sdpa", "sdpa", None, "native"),
    AttentionName("default", "default", None, None),
    AttentionName("flash", "sdpa", "FLASH_ATTENTION", "_native_flash"),
    AttentionName("cudnn", "sdpa", "CUDNN_ATTENTION", "_native_cudnn"),
    AttentionName("efficient", "sdpa", "EFFICIENT_ATTENTION", "_native_efficient"),
    AttentionName("math", "sdpa", "MATH", "_native_math"),
    AttentionName("flex", None, None, "flex"),
    AttentionName("sage", None, None, "sage"),
    AttentionName("xformers", "xformers", None, "xformers"),
)
#: Not a backend of its own: picks one of the kernels (or "sdpa") per card, see capabilities.AUTO_ATTENTION.
AUTO = "auto"

#: Every value ``attention=`` takes; None leaves attention as it is.
ATTENTION_CHOICES: Tuple[Optional[str], ...] = tuple(row.name for row in TABLE) + (AUTO, None)
#: The processor families: choices that are a family of their own ("sdpa", "default", "xformers").
FAMILIES: Tuple[str, ...] = tuple(row.name for row in TABLE if row.family == row.name)
#: Choice -> processor family direct layers are put on before a kernel applies (kernels need SDPA processors).
FAMILY: Dict[str, str] = {row.name: row.family for row in TABLE if row.family is not None}
#: Choice -> torch SDPBackend member forced on direct layers.
KERNELS: Dict[str, str] = {row.name: row.kernel for row in TABLE if row.kernel is not None}
#: Choice -> diffusers' attention-dispatcher backend.
DISPATCHER: Dict[str, str] = {row.name: row.dispatcher for row in TABLE if row.dispatcher is not None}
#: Backends that exist only behind diffusers' dispatcher: a processor calling F.scaled_dot_product_attention has
#: no way to reach flex_attention or sageattn short of replacing the processor, which diffopt does not do.
DISPATCHER_ONLY: Tuple[str, ...] = tuple(row.name for row in TABLE if row.family is None)

"""Version and capability gates, all in one place.

Every gate is a function evaluated when :func:`diffopt.optimize` runs, never at import, so that
importing diffopt on a machine without CUDA (or with an old torch) is always safe and so that tests can
monkeypatch :func:`installed_version` to simulate older releases.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Optional

from packaging.version import Version


def installed_version(package: str) -> Version:
    """The installed version of ``package`` ("torch" or "diffusers"), read at call time."""
    module = __import__(package)
    # Local build tags such as "+cpu" or "+cu130" say nothing about features.
    return Version(Version(module.__version__).base_version)


@dataclass(frozen=True)
class Gate:
    """The answer to "can this feature run here?", with the reason a user can read."""

    feature: str
    ok: bool
    requirement: str = ""
    found: str = ""

    @property
    def reason(self) -> str:
        if self.ok:
            return ""
        return f"{self.feature} needs {self.requirement} (found {self.found})"


def _version_gate(feature: str, package: str, minimum: str) -> Gate:
    found = installed_version(package)
    return Gate(feature, found >= Version(minimum), f"{package} >= {minimum}", f"{package} {found}")


def sdpa() -> Gate:
    """F.scaled_dot_product_attention and diffusers' *2_0 processors that call it."""
    torch_gate = _version_gate("SDPA attention", "torch", "2.0")
    if not torch_gate.ok:
        return torch_gate
    # The 2_0 processors arrived in diffusers 0.14 (diffusers' PyTorch 2.0 page: "Diffusers > 0.13.0").
    return _version_gate("SDPA attention processors", "diffusers", "0.14")


def xformers() -> Gate:
    found = importlib.util.find_spec("xformers") is not None
    return Gate("xformers attention", found, "the xformers package", "installed" if found else "not installed")


def compile() -> Gate:  # noqa: A001 - mirrors the option name
    # diffopt compiles modules in place (nn.Module.compile, torch 2.2) so that ``pipe.unet`` stays the
    # very object the user holds; torch.compile itself arrived in 2.0.
    return _version_gate("torch.compile (in place, nn.Module.compile)", "torch", "2.2")


# ---- attention backends -------------------------------------------------------------------------------------------
# Each gate takes the component's device and dtype: the fused kernels exist only for some cards and dtypes, and
# the answer must come from the module optimize is about to change, read when optimize runs.

HALF = ("float16", "bfloat16")


def _sdpa_kernel_api() -> bool:
    # torch.nn.attention.sdpa_kernel (torch 2.3) is the context manager that dynamo traces; the older
    # torch.backends.cuda.sdp_kernel is deprecated and CUDA-only.
    try:
        from torch.nn.attention import sdpa_kernel  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_capability(device) -> tuple:
    import torch

    return tuple(torch.cuda.get_device_capability(device))


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _card(device, dtype) -> str:
    """How a gate names the card it looked at: "cuda sm90 bfloat16", "cpu float32"."""
    if device.type == "cuda":
        major, minor = cuda_capability(device)
        return f"cuda sm{major}{minor} {_dtype_name(dtype)}"
    return f"{device.type} {_dtype_name(dtype)}"


def _kernel_gate(name: str, device, dtype) -> Gate:
    """One of torch's SDPA kernels, forced with torch.nn.attention.sdpa_kernel."""
    import torch

    feature = f"{name} attention"
    if not _sdpa_kernel_api():
        return Gate(feature, False, "torch.nn.attention.sdpa_kernel (torch >= 2.3)", f"torch {installed_version('torch')}")
    found = _card(device, dtype)
    if name == "math":
        return Gate(feature, True)  # the reference implementation runs on every device and dtype
    if name == "flash" and device.type == "cpu":
        # torch's CPU flash kernel (aten::_scaled_dot_product_flash_attention_for_cpu) takes any float dtype.
        ok = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
        return Gate(feature, ok, "torch's CPU flash kernel", found if ok else f"torch {installed_version('torch')}")
    if device.type != "cuda":
        where = "a CUDA device or the CPU" if name == "flash" else "a CUDA device"
        return Gate(feature, False, where, found)
    if name == "efficient":
        return Gate(feature, True)  # memory-efficient attention: every CUDA card torch supports, fp32 included
    if name == "cudnn" and not (hasattr(torch.nn.attention.SDPBackend, "CUDNN_ATTENTION") and torch.backends.cudnn.is_available()):
        return Gate(feature, False, "a torch built with cuDNN's SDPA backend", f"torch {installed_version('torch')}")
    # FlashAttention-2 in torch and cuDNN's fused attention: Ampere (sm80) or newer, fp16/bf16 only.
    ok = cuda_capability(device) >= (8, 0) and _dtype_name(dtype) in HALF
    return Gate(feature, ok, "CUDA compute capability >= 8.0 and float16/bfloat16 weights", found)


def flex() -> Gate:
    found = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    return Gate("flex attention", found, "torch.nn.attention.flex_attention (torch >= 2.5)", f"torch {installed_version('torch')}")


def sage(device, dtype) -> Gate:
    if importlib.util.find_spec("sageattention") is None:
        return Gate("sage attention", False, "the sageattention package", "not installed")
    # SageAttention's kernels are CUDA (and Triton) kernels for fp16/bf16 inputs.
    ok = device.type == "cuda" and _dtype_name(dtype) in HALF
    return Gate("sage attention", ok, "a CUDA device and float16/bfloat16 weights", _card(device, dtype))


def attention_backend(name: str, device, dtype) -> Gate:
    """Can attention backend ``name`` (a value of ``attention=``) run for a module on ``device`` in ``dtype``?"""
    from .attention_names import KERNELS

    if name in KERNELS:
        return _kernel_gate(name, device, dtype)
    if name == "flex":
        return flex()
    if name == "sage":
        return sage(device, dtype)
    if name == "xformers":
        return xformers()
    if name == "sdpa":
        return sdpa()
    if name == "default":
        return Gate(f"{name} attention", True)  # the classic processors need nothing
    # A name added to attention_names without a gate here would otherwise pass as if it needed nothing.
    raise ValueError(f"no capability gate for attention backend {name!r}")


def dispatcher_backend(name: str, context_parallel: bool = False) -> Gate:
    """diffusers' own requirement check for one of its attention-dispatcher backends (package versions it
    knows better than we do, e.g. the minimum sageattention release); with ``context_parallel`` (the model has a
    parallel config), also whether the backend supports context parallelism, which set_attention_backend demands."""
    feature = f"diffusers attention backend {name!r}"
    try:
        from diffusers.models.attention_dispatch import (
            AttentionBackendName,
            _AttentionBackendRegistry,
            _check_attention_backend_requirements,
        )
    except ImportError:  # a diffusers without the dispatcher has no model that uses it either
        return Gate(feature, True)
    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ValueError) as error:
        return Gate(feature, False, "what diffusers asks for", str(error))
    if context_parallel and not _AttentionBackendRegistry._is_context_parallel_available(AttentionBackendName(name)):
        supported = ", ".join(sorted(_AttentionBackendRegistry._supports_context_parallel))
        return Gate(f"{feature} with context parallelism", False, f"one of {supported}", name)
    return Gate(feature, True)


def sdpa_kernel_priority() -> Gate:
    # sdpa_kernel(..., set_priority=True) (torch 2.6): prefer a kernel, fall back to the others where it cannot run.
    import inspect

    ok = _sdpa_kernel_api() and "set_priority" in inspect.signature(__import__("torch").nn.attention.sdpa_kernel).parameters
    return Gate("SDPA kernel priority", ok, "sdpa_kernel(set_priority=...) (torch >= 2.6)", f"torch {installed_version('torch')}")


#: What ``attention="auto"`` picks, by card class (see :func:`card_class`); a class not listed gets "sdpa".
#: The first entry whose gate is open wins, so a torch built without a kernel falls through to the next.
#: From what is known (torch's FlashAttention-2 beats the other SDPA kernels on Ampere and newer in fp16/bf16) and
#: from what torch's own dispatch chose on an H200 (below); docs/benchmarks.md has the measurements.
#: "auto" only ever picks torch's own SDPA kernels, and only as a preference: where the kernel cannot run
#: (an attention mask flash cannot take, ...) torch falls back instead of failing.
AUTO_ATTENTION = {
    # Hopper: torch 2.11's own SDPA dispatch already ran cuDNN's fused attention for SD1.5 on an H200 (the kernel
    # cudnn_generated_fort_native_sdpa_sm90_flash_fprop in a kernel profile of SD1.5 on an H200),
    # so cuDNN first keeps that choice on every torch; FlashAttention-2 where cuDNN's backend is missing.
    "cuda-sm90+-half": ("cudnn", "flash", "sdpa"),
    "cuda-sm80+-half": ("flash", "sdpa"),
    "cuda": ("sdpa",),
    "cpu": ("sdpa",),
}


def card_class(device, dtype) -> str:
    """The key of :data:`AUTO_ATTENTION` for a module on ``device`` in ``dtype``."""
    if device.type == "cuda":
        if cuda_capability(device) >= (9, 0) and _dtype_name(dtype) in HALF:
            return "cuda-sm90+-half"
        if cuda_capability(device) >= (8, 0) and _dtype_name(dtype) in HALF:
            return "cuda-sm80+-half"
        return "cuda"
    return device.type


def auto_attention(device, dtype) -> tuple:
    """``(backend, why)``: what ``attention="auto"`` picks for a module on ``device`` in ``dtype``.

    Example::

        >>> auto_attention(torch.device("cpu"), torch.float32)
        ('sdpa', 'cpu float32')
    """
    for name in AUTO_ATTENTION.get(card_class(device, dtype), ("sdpa",)):
        if name == "sdpa":
            break
        if attention_backend(name, device, dtype).ok and sdpa_kernel_priority().ok:
            return name, _card(device, dtype)
    # Without SDPA (torch < 2.0, diffusers < 0.14) the classic processors are all there is.
    return ("sdpa" if sdpa().ok else "default"), _card(device, dtype)
#: The torchao release diffopt's quantization is tested with: its int8 configs take ``version=2`` (Int8Tensor).
TORCHAO_MINIMUM = "0.17"
#: float8 matmuls (torch._scaled_mm) need Ada (sm89) or Hopper (sm90) tensor cores or newer.
FP8_MIN_CAPABILITY = (8, 9)


def torchao_version() -> Optional[Version]:
    """The installed torchao's version, or None; read from the package metadata, without importing torchao."""
    if importlib.util.find_spec("torchao") is None:
        return None
    return Version(Version(importlib.metadata.version("torchao")).base_version)


def _torchao_problem() -> Optional[str]:
    found = torchao_version()
    if found is None:
        return "not installed"
    if found < Version(TORCHAO_MINIMUM):
        return f"torchao {found}"
    try:
        # Imported only here, when a user asked for quantize=: importing diffopt never imports torchao.
        import torchao.quantization  # noqa: F401
    except Exception as error:  # an ABI mismatch with this torch shows up here, not at pip install
        return f"torchao {found}, which fails to import: {type(error).__name__}: {error}"
    return None


def _fp8_device_problem(device) -> Optional[str]:
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"the model on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"{name}, compute capability {capability[0]}.{capability[1]}"
    return None


def quantize(mode: str, device) -> Gate:
    """torchao >= TORCHAO_MINIMUM for every mode; for "fp8" also a CUDA device of compute capability >= 8.9.
    When several things are missing, the reason names all of them."""
    requirements, found = [], []
    problem = _torchao_problem()
    if problem:
        requirements.append(f"torchao >= {TORCHAO_MINIMUM} (pip install 'diffopt[quant]')")
        found.append(problem)
    if mode == "fp8":
        problem = _fp8_device_problem(device)
        if problem:
            major, minor = FP8_MIN_CAPABILITY
            requirements.append(f"a CUDA GPU of compute capability >= {major}.{minor} (Ada, Hopper or newer)")
            found.append(problem)
    return Gate(f"{mode} quantization", not requirements, " and ".join(requirements), "; ".join(found))
class UnsupportedFeatureError(RuntimeError):
    """A feature the user asked for by name cannot run with the installed versions or hardware."""


def require_or_skip(gate: Gate, explicit: bool, option: str) -> str:
    """Return "" when the gate is open; the skip reason when it is closed and the option was left at its
    default; raise when the user named the option."""
    if gate.ok:
        return ""
    if explicit:
        raise UnsupportedFeatureError(f"{option}: {gate.reason}")
    return gate.reason


def first_block_cache() -> Gate:
    """diffusers' First Block Cache hooks (``diffusers.hooks.FirstBlockCacheConfig``)."""
    import diffusers.hooks

    found = hasattr(diffusers.hooks, "FirstBlockCacheConfig")
    return Gate(
        "first-block cache", found, "diffusers with hooks.FirstBlockCacheConfig", f"diffusers {installed_version('diffusers')}"
    )


def device_postprocess() -> Gate:
    """diffusers' ``VaeImageProcessor._denormalize_conditionally``: the step of ``postprocess`` that the 8-bit
    conversion on the device reuses, so that denormalizing stays diffusers' own code."""
    from diffusers.image_processor import VaeImageProcessor

    found = hasattr(VaeImageProcessor, "_denormalize_conditionally")
    return Gate(
        "8-bit conversion on the device", found, "diffusers with VaeImageProcessor._denormalize_conditionally",
        f"diffusers {installed_version('diffusers')}",
    )

"""What the benchmark ran on, and the device helpers every measurement shares.

Example:
    >>> from diffopt.bench.env import environment
    >>> sorted(environment("cpu"))[:3]
    ['argv', 'cpu_count', 'cuda']
"""
from __future__ import annotations

import datetime
import gc
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import torch

# torch.OutOfMemoryError is the name since torch 2.5; torch.cuda's alias also exists on older versions.
OutOfMemoryError = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock time covers it (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Release what the previous cell left: compiled graphs (and their CUDA graph pools), then cached blocks."""
    torch.compiler.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> Optional[int]:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def count_gpu_waits(run: Callable[[], Any]) -> tuple[Any, int]:
    """``run()``'s result and how many times it made the CPU wait for the GPU, counted by torch's sync debug mode
    (a warning at each synchronizing call); the previous mode is put back."""
    import warnings

    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = run()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return result, sum("synchroniz" in str(w.message) for w in caught)


def matmul_peak_flops(
    device: torch.device, dtype: torch.dtype, n: int = 8192, iterations: int = 20
) -> Optional[float]:
    """FLOP/s of a large square matmul in ``dtype``: the practical peak MFU is measured against (CUDA only).

    Measured rather than taken from a datasheet: clocks, power limits and the card's variant (H100 SXM vs
    PCIe) move it by tens of percent. An H200 gives about 760 TFLOP/s in fp16.
    """
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(iterations):
        a @ b
    sync(device)
    elapsed = time.perf_counter() - start
    del a, b
    free_memory(device)
    return iterations * 2 * n**3 / elapsed


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        pass
    # Run from a source tree (PYTHONPATH=$PWD): no installed metadata, ask the module.
    try:
        return getattr(__import__(package), "__version__", None)
    except Exception:  # a broken or half-written package must not stop the benchmark
        return None


def _nvidia_smi(query: str) -> Optional[str]:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.strip().splitlines()
    return lines[0].strip() if result.returncode == 0 and lines else None


def environment(device, argv: Optional[list[str]] = None) -> dict:
    """Versions, hardware, date and command line of this run, for results.json."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    return {
        "argv": list(sys.argv if argv is None else argv),
        "cpu_count": os.cpu_count(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "diffopt": _version("diffopt"),
        "diffusers": _version("diffusers"),
        "driver": _nvidia_smi("driver_version") if cuda else None,
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
    }

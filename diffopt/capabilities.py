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
    # The 2_0 processors arrived in diffusers 0.14 (the seed page: "Diffusers > 0.13.0").
    return _version_gate("SDPA attention processors", "diffusers", "0.14")


def xformers() -> Gate:
    found = importlib.util.find_spec("xformers") is not None
    return Gate("xformers attention", found, "the xformers package", "installed" if found else "not installed")


def compile() -> Gate:  # noqa: A001 - mirrors the option name
    # diffopt compiles modules in place (nn.Module.compile, torch 2.2) so that ``pipe.unet`` stays the
    # very object the user holds; torch.compile itself arrived in 2.0.
    return _version_gate("torch.compile (in place, nn.Module.compile)", "torch", "2.2")


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

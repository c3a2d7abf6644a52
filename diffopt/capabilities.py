"""Version and capability gates, all in one place.

Every gate is a function evaluated when :func:`diffopt.optimize` runs, never at import, so that
importing diffopt on a machine without CUDA (or with an old torch) is always safe and so that tests can
monkeypatch :func:`installed_version` to simulate older releases.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

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


def fuse_projections(model) -> Gate:
    """Fused QKV projections through the model's own fuse_qkv_projections, when they can be faithful: not
    for models without the method, with added K/V attention, with LoRA layers on the projections, or whose
    processors would ignore the fused layers."""
    from .transforms.fuse_projections import blocker

    found = blocker(model)
    if found is None:
        return Gate("fused QKV projections", True)
    requirement, what = found
    return Gate("fused QKV projections", False, requirement, what)


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

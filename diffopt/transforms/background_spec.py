"""What another process needs to compile this process's model as it is (background.py sends it, background_child.py
uses it): a description of each call's inputs (shapes, strides, dtypes, plain values; never the values of tensors)
that it turns back into inputs of its own; a description of the model (parameters, buffers, attention processors,
replaced forwards) that its copy must match; whether a copy built from the model's config can match at all; and the
inductor and dynamo settings a cached graph is looked up by."""
from __future__ import annotations

import dataclasses
import pickle
from typing import Any, Dict, List, Optional, Tuple

import torch


class Undescribable(ValueError):
    """A call input that cannot be described to another process (an object other than tensors and plain values)."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """A tensor input as compiled code sees it: everything but its values."""

    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    dtype: str
    device: str
    requires_grad: bool
    inference: bool  # made under inference mode: dynamo guards on it

    def make(self) -> torch.Tensor:
        dtype = getattr(torch, self.dtype.replace("torch.", ""))
        with torch.inference_mode(self.inference):
            tensor = torch.empty_strided(self.shape, self.stride, dtype=dtype, device=self.device).zero_()
        return tensor.requires_grad_(True) if self.requires_grad else tensor


@dataclasses.dataclass(frozen=True)
class AnyFloat:
    """A float input whose value selects no compiled graph (dynamo's ``specialize_float=False``, torch's default):
    a ControlNet's conditioning scale, which a call may change from step to step."""

    def make(self) -> float:
        return 1.0


def describe_value(value: Any, exact_floats: bool = True) -> Any:
    """``value`` with every tensor replaced by its :class:`TensorSpec`; plain values kept (floats as
    :class:`AnyFloat` unless ``exact_floats``). Hashable."""
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), tuple(value.stride()), str(value.dtype), str(value.device),
                          value.requires_grad, value.is_inference())  # fmt: skip
    if isinstance(value, float) and not exact_floats:
        return AnyFloat()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(describe_value(v, exact_floats) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, describe_value(v, exact_floats)) for k, v in value.items()))
    raise Undescribable(f"a {type(value).__module__}.{type(value).__qualname__}")


def make_value(described: Any) -> Any:
    """The inverse of :func:`describe_value`, with zeros for every tensor."""
    if isinstance(described, (TensorSpec, AnyFloat)):
        return described.make()
    if isinstance(described, tuple):
        kind, items = described
        if kind == "dict":
            return {k: make_value(v) for k, v in items}
        return (list if kind == "list" else tuple)(make_value(v) for v in items)
    return described


def describe_call(args, kwargs, exact_floats: bool = True) -> Tuple:
    """One call's inputs and the grad mode it runs under: what selects a graph (a recorded one with
    ``exact_floats``, which replays the float values it was recorded with; a compiled one without)."""
    if any(torch.is_autocast_enabled(device) for device in ("cuda", "cpu")):
        raise Undescribable("autocast is on")
    modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    return (modes, describe_value(tuple(args), exact_floats), describe_value(dict(kwargs), exact_floats))


def floats_select_graphs() -> bool:
    import torch._dynamo.config  # loaded already: the compiled call made a torch.compile

    return torch._dynamo.config.specialize_float


def make_call(signature: Tuple) -> Tuple[Tuple[bool, bool], tuple, dict]:
    modes, args, kwargs = signature
    return modes, make_value(args), make_value(kwargs)


def structure(module: torch.nn.Module) -> List[tuple]:
    """What the child's copy must match for its graphs to be this model's: every parameter and buffer (name, shape,
    dtype, strides, requires_grad), every attention processor's class, and every forward replaced on an instance."""
    found: List[tuple] = []
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        found.append(("tensor", name, tuple(tensor.shape), str(tensor.dtype), tuple(tensor.stride()), tensor.requires_grad))
    for name, sub in module.named_modules():
        processor = getattr(sub, "processor", None)
        if processor is not None:
            found.append(("processor", name, f"{type(processor).__module__}.{type(processor).__qualname__}"))
        forward = vars(sub).get("forward")
        if forward is not None:
            function = getattr(forward, "__func__", forward)
            found.append(("forward", name, getattr(function, "__qualname__", type(function).__qualname__)))
    return found


def first_difference(theirs: List[tuple], ours: List[tuple]) -> Optional[str]:
    """The first entry of ``ours`` (the original model) that the copy lacks or has otherwise, or None."""
    copy = {entry[:2]: entry for entry in theirs}
    for entry in ours:
        other = copy.pop(entry[:2], None)
        if other != entry:
            return f"{entry[0]} {entry[1]!r}: the model has {entry[2:]}, the copy {other[2:] if other else 'nothing'}"
    if copy:
        entry = next(iter(copy.values()))
        return f"{entry[0]} {entry[1]!r}: the copy has {entry[2:]}, the model nothing"
    return None


def why_not_rebuildable(module: torch.nn.Module) -> Optional[str]:
    """Why another process cannot build ``module`` from its config, or None. Builds the copy on the meta device
    (no memory, a fraction of a second) to find layers its config does not describe (LoRA, IP-Adapter)."""
    cls = type(module)
    if not callable(getattr(cls, "from_config", None)) or getattr(module, "config", None) is None:
        return f"{cls.__qualname__} is not a diffusers model that can be built from its config"
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        return f"{cls.__qualname__} is defined in {cls.__module__}, which another process cannot import"
    try:
        with torch.device("meta"):
            copy = cls.from_config(dict(module.config))
    except Exception as error:  # noqa: BLE001 - the reason is the answer
        return f"{cls.__qualname__}.from_config(its config) fails ({type(error).__name__}: {error})"
    difference = first_difference(_unfused_shapes(copy), _unfused_shapes(module))
    if difference:
        return (f"it has layers a model built from its config lacks ({difference}); LoRA or IP-Adapter layers do "
                "that: fuse and unload a LoRA first (pipe.fuse_lora(); pipe.unload_lora_weights())")  # fmt: skip
    return None


#: The layers that fusing an attention layer's projections adds (diffusers' fuse_projections, which diffopt's
#: fuse_projections option calls and the child repeats): not layers the config leaves out.
FUSED_PROJECTIONS = ("to_qkv", "to_kv", "to_added_qkv")


def _unfused_shapes(model: torch.nn.Module) -> List[tuple]:
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [("tensor", name, tuple(t.shape)) for name, t in tensors if name.split(".")[-2] not in FUSED_PROJECTIONS]


def compile_settings() -> Dict[str, Dict[str, Any]]:
    """This process's inductor and dynamo settings that pickle can carry: they are part of what a cached graph is
    looked up by (the diffusers docs' compile recipe, for one, sets inductor options)."""
    import torch._dynamo.config
    import torch._inductor.config

    found = {}
    for name, config in (("inductor", torch._inductor.config), ("dynamo", torch._dynamo.config)):
        values = {}
        for key, value in config.save_config_portable().items():
            try:
                pickle.dumps(value)
            except Exception:  # noqa: BLE001 - a callable pass or a lock: not a lookup key
                continue
            values[key] = value
        found[name] = values
    return found

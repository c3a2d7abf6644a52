"""Weight (and activation) quantization of a denoiser's Linear layers with torchao, undoable.

torchao's ``quantize_`` swaps ``linear.weight`` for a tensor subclass (``Int8Tensor``, ``Float8Tensor``) whose
``F.linear`` runs the 8-bit matmul; ``torch.compile`` then traces through the subclass and fuses the activation
quantization into the neighbouring kernels. diffopt quantizes one layer at a time, keeps the original
``Parameter`` object, and moves its data to the CPU while the layer runs quantized, so that the GPU holds the
8-bit copy only; undo moves the data back and puts the very same ``Parameter`` back on the layer.

Which layers (:func:`select_layers`): ``nn.Linear`` layers only (attention projections, feed-forward layers,
the linear ``proj_in``/``proj_out`` of SDXL-style transformer blocks), except

* per-sample conditioning: the timestep / class / pooled-text embedding MLPs, every ResNet's
  ``time_emb_proj`` and the AdaLayerNorm modulation layers of transformers. They run on one row per sample
  (M = batch size), so there is no matmul work for 8-bit kernels to save, and an error there shifts every
  token of every block that the embedding conditions;
* the transformer's final ``proj_out``, which writes the noise prediction itself: no residual stream dilutes
  its rounding error;
* layers narrower than :data:`MIN_FEATURES` in or out: below the K of one 8-bit tensor-core MMA (32), the
  activation quantize kernel costs more than the matmul saves;
* layers whose in/out features are not multiples of :data:`ALIGNMENT` for the mode: ``torch._scaled_mm``
  (fp8) needs multiples of 16, cuBLAS int8 GEMMs multiples of 8 (torchao otherwise falls back to an int32
  matmul on the CPU);
* weights that are already quantized or not floating point, in a dtype torchao does not take (float64), or shared
  with another module (tied weights: moving the original off the GPU would move it from under the other module too).

Convolutions stay as they are: torchao's int8 configs handle Linear layers only, and the UNet's convolutions
are where its fp16 time goes with cuDNN kernels that 8-bit weights would not speed up.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import List, Optional, Tuple

import torch

from .. import capabilities
from ..components import CONTROLNET, DENOISER, execution_device, tensor_bytes
from ..layers import Applied, Layer, attach, detach, mark
from ..plan import Step
from ..report import SKIPPED

NAME = "quantize"
MODES = ("fp8", "int8", "int8-weight-only")
DESCRIPTIONS = {
    "fp8": "float8 dynamic activation + float8 weight",
    "int8": "int8 dynamic activation + int8 weight",
    "int8-weight-only": "int8 weight-only",
}
#: Narrower layers are not quantized: one 8-bit tensor-core MMA reduces over K = 32.
MIN_FEATURES = 32
#: in_features and out_features must be multiples of this for the mode's 8-bit kernels.
ALIGNMENT = {"fp8": 16, "int8": 8, "int8-weight-only": 1}
#: Where the original weights wait while their layer runs quantized (see the module docstring).
PARKING_DEVICE = torch.device("cpu")

# Why a layer was left as it was; the report counts layers by these reasons.
CONDITIONING = "per-sample conditioning"
OUTPUT = "final output projection"
NARROW = f"under {MIN_FEATURES} features"
UNALIGNED = "features not a multiple of {}"
NOT_FLOAT = "weight already quantized or not floating point"
#: The weight dtypes torchao's configs take; on any other (float64) its quantize asserts on the dtype.
QUANTIZABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE = "weight in a dtype torchao does not quantize (it takes float32, float16, bfloat16)"
SHARED = "weight shared with another module"
LEFT_BY_TORCHAO = "left unquantized by torchao"


def _is_conditioning(name: str, ancestors: List[torch.nn.Module]) -> bool:
    if name.rsplit(".", 1)[-1] == "time_emb_proj":  # ResnetBlock2D's projection of the timestep embedding
        return True
    for module in ancestors:
        kind = type(module).__name__
        # TimestepEmbedding, TextTimeEmbedding, CombinedTimestep*Embeddings, ...; AdaLayerNorm*, AdaGroupNorm.
        if "Embedding" in kind or kind.startswith("Ada"):
            return True
    return False


def skip_reason(
    name: str, linear: torch.nn.Linear, ancestors: List[torch.nn.Module], mode: str, shared: bool = False
) -> Optional[str]:
    """Why ``linear`` (at path ``name`` of the model, below ``ancestors``) is not quantized, or None."""
    weight = linear.weight
    if type(weight) is not torch.nn.Parameter or not weight.is_floating_point():
        return NOT_FLOAT
    if weight.dtype not in QUANTIZABLE_DTYPES:
        return DTYPE
    if shared:
        return SHARED
    if _is_conditioning(name, ancestors):
        return CONDITIONING
    if name == "proj_out":  # a top-level proj_out is a transformer's last layer; UNet blocks nest theirs
        return OUTPUT
    if min(linear.in_features, linear.out_features) < MIN_FEATURES:
        return NARROW
    alignment = ALIGNMENT[mode]
    if linear.in_features % alignment or linear.out_features % alignment:
        return UNALIGNED.format(alignment)
    return None


def select_layers(model: torch.nn.Module, mode: str) -> Tuple[List[Tuple[str, torch.nn.Linear]], Counter]:
    """The Linear layers of ``model`` that ``mode`` quantizes, by path, and the count of the others by reason."""
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {MODES}, got {mode!r}")
    chosen, skipped = [], Counter()
    owners = Counter(id(p) for m in model.modules() for p in m._parameters.values() if p is not None)

    def visit(module: torch.nn.Module, prefix: str, ancestors: List[torch.nn.Module]) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            if isinstance(child, torch.nn.Linear):
                reason = skip_reason(name, child, ancestors, mode, shared=owners[id(child.weight)] > 1)
                if reason:
                    skipped[reason] += 1
                else:
                    chosen.append((name, child))
            visit(child, name + ".", ancestors + [child])

    visit(model, "", [])
    return chosen, skipped


def torchao_config(mode: str, weight_dtype: torch.dtype):
    """The torchao config of ``mode`` for a weight of ``weight_dtype`` (torchao >= 0.17)."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        PerRow,
        PerTensor,
    )

    # set_inductor_config=False everywhere: torchao's default writes global inductor flags (coordinate-descent
    # tuning among them, which the issue saw fail to finish compiling SD1.5 in 330 s) and
    # torch.set_float32_matmul_precision, and nothing ever undoes them. version=2 is torchao's Int8Tensor
    # (version 1, the AffineQuantizedTensor, is deprecated and warns once per layer).
    if mode == "int8":
        with warnings.catch_warnings():
            # Its __post_init__ builds a PlainLayout, which only version 1 uses, and warns that it is deprecated.
            warnings.filterwarnings("ignore", message=".*PlainLayout is deprecated", category=UserWarning)
            return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False, version=2)
    if mode == "int8-weight-only":
        return Int8WeightOnlyConfig(set_inductor_config=False, version=2)
    # torchao's per-row float8 scales need a bfloat16 weight; fp16 and fp32 layers get one scale per tensor.
    granularity = PerRow() if weight_dtype == torch.bfloat16 else PerTensor()
    return Float8DynamicActivationFloat8WeightConfig(granularity=granularity, set_inductor_config=False)


def _granularity(mode: str, dtypes) -> str:
    if mode == "fp8":
        return "per-row scales" if set(dtypes) == {torch.bfloat16} else "per-tensor scales"
    return "per-row weight scales" + (", per-token activation scales" if mode == "int8" else "")


def _megabytes(tensors) -> float:
    return tensor_bytes(tensors) / 2**20


def describe_skipped(skipped: Counter) -> str:
    """"6 per-sample conditioning, 2 under 32 features": the layers left as they were, by reason."""
    return ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())


class QuantizedLinear(Layer):
    """On one quantized layer: the original Parameter and what torchao changed on the instance. Undo puts the very
    same Parameter back, on the device and in the dtype the layer has now (after a ``.to()`` since optimize)."""

    transform = NAME

    def __init__(self, linear: torch.nn.Linear, model: torch.nn.Module):
        self.weight = linear._parameters["weight"]
        self.model = model  # whose plain weights say which dtype the layer would have now
        # torchao replaces extra_repr on the instance to show the quantized weight; remember what was there.
        self.had_repr = "extra_repr" in vars(linear)
        self.repr = vars(linear).get("extra_repr")

    def park(self) -> bool:
        """Move the original's data off the accelerator; True if it moved."""
        if self.weight.device == PARKING_DEVICE:
            return False
        self.weight.data = self.weight.data.to(PARKING_DEVICE)
        return True

    def original_now(self, linear) -> torch.Tensor:
        """The original weight as the layer would hold it now: its current device, and its current dtype (a
        quantized weight reports the dtype it stands for; the bias, where there is one, says it too)."""
        current = linear.weight
        plain = (p for p in self.model.parameters() if type(p) is torch.nn.Parameter and p.is_floating_point())
        dtype = linear.bias.dtype if linear.bias is not None else next(plain, self.weight).dtype
        data = self.weight.data
        if current.device.type == "meta":
            return torch.empty_like(data, device="meta", dtype=dtype)
        return data.to(device=current.device, dtype=dtype)

    def undo(self, owner) -> None:
        now = self.original_now(owner)
        if now.device.type == "meta" and self.weight.device.type != "meta":
            # A Parameter cannot change its device type through .data: the model went to meta, so does the weight.
            owner.weight = torch.nn.Parameter(now, requires_grad=self.weight.requires_grad)
        else:
            self.weight.data = now
            owner.weight = self.weight
        if self.had_repr:
            vars(owner)["extra_repr"] = self.repr
        else:
            vars(owner).pop("extra_repr", None)


class _CleanStateDict:
    """A state-dict hook on the quantized model: ``state_dict()`` (and so ``save_pretrained``) returns the original
    weights, as the model would hold them now, instead of torchao's 8-bit tensors, which safetensors cannot write."""

    def __init__(self, layers):
        self.layers = layers  # [(path, linear, QuantizedLinear)]

    def __call__(self, module, state_dict, prefix, local_metadata):
        for path, linear, layer in self.layers:
            key = f"{prefix}{path}.weight"
            if key in state_dict and linear.weight is not layer.weight:
                state_dict[key] = layer.original_now(linear)
        return state_dict


class StateDictHook(Layer):
    """A state-dict hook diffopt registered on a model; undo removes it."""

    def __init__(self, transform: str, hook_id: int):
        self.transform, self.hook_id = transform, hook_id

    def undo(self, owner) -> None:
        owner._state_dict_hooks.pop(self.hook_id, None)


def apply_quantize(model: torch.nn.Module, mode: str) -> Optional[Applied]:
    """Quantize the Linear layers :func:`select_layers` picks in ``model``, each with a :class:`QuantizedLinear`
    layer on it. Returns what changed, or None when no layer qualifies. Needs torchao (see capabilities.quantize)."""
    from torchao.quantization import quantize_

    chosen, skipped = select_layers(model, mode)
    since, done = mark(), []
    moved = False
    before = _megabytes(linear.weight for _, linear in chosen)
    try:
        for path, linear in chosen:
            layer = QuantizedLinear(linear, model)
            done.append((path, linear, layer))  # before quantize_, so a layer torchao fails half-way goes back too
            config = torchao_config(mode, layer.weight.dtype)
            quantize_(linear, config, filter_fn=lambda module, fqn, target=linear: module is target)
            if type(linear.weight) is torch.nn.Parameter:  # torchao declined (shape or dtype it cannot take)
                done.pop()[2].undo(linear)
                skipped[LEFT_BY_TORCHAO] += 1
                continue
            # Parked one layer at a time, so the peak is one layer above the model, never a second copy.
            moved = layer.park() or moved
        for _, linear, layer in done:
            attach(linear, layer)
        if done:
            handle = model._register_state_dict_hook(_CleanStateDict(done))
            attach(model, StateDictHook(NAME, handle.id))
    except BaseException:
        for _, linear, layer in reversed(done):
            layer.undo(linear)
            detach(linear, layer)
        raise
    if not done:
        return None
    after = _megabytes(t for _, linear, _ in done for t in _storage(linear.weight))
    detail = (
        f"{DESCRIPTIONS[mode]} ({_granularity(mode, {layer.weight.dtype for _, _, layer in done})}): {len(done)} of "
        f"{len(chosen) + sum(skipped.values())} Linear layers, weights {before:.1f} -> {after:.1f} MiB; "
        + (f"originals moved to {PARKING_DEVICE.type} memory until restore" if moved else "originals kept for restore")
    )
    if skipped:
        detail += f"; not quantized: {describe_skipped(skipped)}"
    return Applied(detail, since, model)


def _storage(weight: torch.Tensor) -> List[torch.Tensor]:
    """The plain tensors a torchao weight is made of (its 8-bit data and its scales)."""
    names = getattr(weight, "tensor_data_names", None)
    if names is None and hasattr(weight, "__tensor_flatten__"):
        names = weight.__tensor_flatten__()[0]
    if not names:
        return [weight]
    parts = [getattr(weight, name) for name in names] + [
        getattr(weight, name) for name in getattr(weight, "optional_tensor_data_names", ()) or ()
    ]
    return [p for p in parts if isinstance(p, torch.Tensor)]



def plan(ctx) -> List[Step]:
    mode, steps = ctx.config.quantize, []
    if mode is None:
        return steps
    for component in ctx.components:
        if component.role not in (DENOISER, CONTROLNET):
            continue  # the VAE runs once per image and is conv-bound: 8-bit Linear layers would not pay there
        gate = capabilities.quantize(mode, execution_device(component.module))
        reason = capabilities.require_or_skip(gate, ctx.config.asks_for(NAME), f"quantize={mode!r}")
        if reason:
            ctx.report.add(component.name, NAME, SKIPPED, reason)
            continue
        chosen, skipped = select_layers(component.module, mode)
        if not chosen:
            kept = describe_skipped(skipped) or "it has none"
            ctx.report.add(component.name, NAME, SKIPPED, f"no Linear layer worth quantizing ({kept})")
            continue
        steps.append(Step(component.name, NAME, lambda module=component.module: apply_quantize(module, mode)))
    return steps

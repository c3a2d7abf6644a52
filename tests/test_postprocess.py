"""Decoded images made 8-bit on their device (transforms/postprocess.py): the PIL images are diffusers' own, byte
for byte, on inputs chosen to break that (every fp16 value, exact rounding ties, NaN, values far outside [-1, 1]);
everything but the PIL path of denormalized images goes to diffusers' method; restore leaves no trace."""
import copy
import pickle

import numpy as np
import pytest
import torch
from conftest import CROSS_DIM, sd_pipeline, tiny_unet
from diffusers.image_processor import VaeImageProcessor
from test_roundtrip import assert_same, snapshot

import diffopt
from diffopt.transforms.postprocess import PostprocessOnDevice, apply_device_postprocess

# Only this transform, so that a pipeline's images differ from the unoptimized ones by nothing else.
ONLY_POSTPROCESS = dict(attention=None, memory_format=None, compile=False)


def every_fp16_value() -> torch.Tensor:
    """All 65536 fp16 bit patterns as one 1x4x128x128 image: NaNs, infinities, subnormals, and every value whose
    pixel lands exactly on .5 (0.0 becomes 127.5)."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).reshape(1, 4, 128, 128)


def rounding_ties() -> torch.Tensor:
    """fp32 images whose pixels, after denormalize and *255, are exactly k + 0.5: where half-to-even rounding
    matters. Found by search, since few of the values 2 * (k + 0.5) / 255 - 1 land on a tie."""
    near = torch.tensor([2 * (k + 0.5) / 255 - 1 for k in range(255)], dtype=torch.float32)
    ulps = torch.arange(-64, 65, dtype=torch.int32)
    candidates = (near.view(torch.int32)[:, None] + ulps).view(torch.float32).reshape(-1)
    pixels = (candidates * 0.5 + 0.5).clamp(0, 1) * 255
    ties = candidates[pixels - pixels.floor() == 0.5]
    assert len(ties) > 10, "the search must find rounding ties to test"
    side = int(len(ties) ** 0.5)
    return ties[: side * side].reshape(1, 1, side, side).expand(2, 3, side, side).contiguous()


def far_outside(dtype, batch=3, channels=3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, channels, 8, 8, generator=g) * 4).to(dtype)


def with_nan(dtype) -> torch.Tensor:
    image = far_outside(dtype)
    image[0, 0, :2] = float("nan")
    image[1, 2, 3] = float("inf")
    image[2, 1, 4] = float("-inf")
    return image


IMAGES = {
    "every-fp16-value": every_fp16_value,
    "rounding-ties-fp32": rounding_ties,
    "fp16-far-outside": lambda: far_outside(torch.float16),
    "fp32-far-outside": lambda: far_outside(torch.float32),
    "bf16": lambda: far_outside(torch.bfloat16),
    "fp64": lambda: far_outside(torch.float64, batch=1),
    "nan-and-inf-fp16": lambda: with_nan(torch.float16),
    "nan-and-inf-fp32": lambda: with_nan(torch.float32),
    "one-channel": lambda: far_outside(torch.float16, batch=2, channels=1),
    "four-channels": lambda: far_outside(torch.float32, batch=2, channels=4),
}


def pil_bytes(images):
    return [(image.mode, image.size, image.tobytes()) for image in images]


@pytest.fixture
def numpy_conversions(monkeypatch):
    """Counts calls of diffusers' pt_to_numpy: zero means the hook made the images itself."""
    calls = []
    original = VaeImageProcessor.pt_to_numpy

    def counted(images):
        calls.append(images.shape)
        return original(images)

    monkeypatch.setattr(VaeImageProcessor, "pt_to_numpy", staticmethod(counted))
    return calls


# The CPU in every run; a CUDA card where there is one, which is where the conversion is meant to run.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # numpy's NaN cast
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("do_denormalize", [None, "all-true"])
@pytest.mark.parametrize("kind", IMAGES)
def test_pil_images_are_diffusers_own_byte_for_byte(kind, do_denormalize, device, numpy_conversions):
    image = IMAGES[kind]().to(device)
    flags = [True] * image.shape[0] if do_denormalize else None
    processor = VaeImageProcessor()
    expected = processor.postprocess(image.clone(), output_type="pil", do_denormalize=flags)
    numpy_conversions.clear()

    applied = apply_device_postprocess(processor)
    assert pil_bytes(processor.postprocess(image.clone(), output_type="pil", do_denormalize=flags)) == pil_bytes(expected)
    assert numpy_conversions == []  # made on the tensor's device, not by diffusers' numpy path
    if image.shape[1] == 1:
        assert {i.mode for i in expected} == {"L"}
    applied.undo()
    assert vars(processor).keys() == {"_internal_dict"}


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
@pytest.mark.parametrize(
    "output_type, do_denormalize",
    [("pil", [True, False, True]), ("pil", [True]), ("np", None), ("pt", None), ("latent", None), ("pt", [False] * 3)],
    ids=["pil-one-not-denormalized", "pil-short-list", "np", "pt", "latent", "pt-none-denormalized"],
)
def test_everything_else_goes_to_diffusers_method_unchanged(output_type, do_denormalize, numpy_conversions):
    image = far_outside(torch.float16)
    processor = VaeImageProcessor()
    hooked = VaeImageProcessor()
    apply_device_postprocess(hooked)

    def run(p):
        try:
            return p.postprocess(image.clone(), output_type=output_type, do_denormalize=do_denormalize)
        except IndexError as error:  # diffusers' own error for a list shorter than the batch, kept as it is
            return repr(error)

    expected, numpy_conversions[:] = run(processor), []
    got = run(hooked)
    if output_type == "pil" and isinstance(expected, list):
        assert pil_bytes(got) == pil_bytes(expected)
        assert numpy_conversions  # diffusers made them
    elif output_type == "np":
        assert np.array_equal(got, expected)
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(got, expected)
    else:
        assert got == expected


def test_a_processor_without_normalization_keeps_diffusers_path(numpy_conversions):
    image = far_outside(torch.float32).clamp(0, 1)  # what such a processor gets: not clamped by denormalize
    processor = VaeImageProcessor(do_normalize=False)
    expected = processor.postprocess(image)
    apply_device_postprocess(processor)
    numpy_conversions.clear()
    assert pil_bytes(processor.postprocess(image)) == pil_bytes(expected) and numpy_conversions


def test_a_tensor_that_requires_grad_keeps_diffusers_error():
    processor = VaeImageProcessor()
    apply_device_postprocess(processor)
    with pytest.raises(RuntimeError, match="requires grad"):
        processor.postprocess(torch.zeros(1, 3, 4, 4, requires_grad=True))


def run_pil(pipe, batch=2):
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        return pipe(
            prompt_embeds=torch.randn(1, 7, CROSS_DIM, generator=g), negative_prompt_embeds=torch.randn(1, 7, CROSS_DIM, generator=g),
            num_inference_steps=2, num_images_per_prompt=batch, generator=torch.Generator().manual_seed(1),
        ).images


def test_a_pipeline_makes_the_same_images_and_restore_gives_back_diffusers_method(numpy_conversions):
    pipe = sd_pipeline()
    processor = pipe.image_processor
    expected = pil_bytes(run_pil(pipe))  # first, since a call sets attributes on the pipeline
    before_vars, before = dict(vars(processor)), snapshot(pipe)

    report = diffopt.optimize(pipe, **ONLY_POSTPROCESS)
    (step,) = report.applied
    assert (step.component, step.transform) == ("image_processor", "device_postprocess") and "8-bit" in step.detail
    assert isinstance(vars(processor)["postprocess"], PostprocessOnDevice)
    numpy_conversions.clear()
    assert pil_bytes(run_pil(pipe)) == expected and numpy_conversions == []

    report = diffopt.restore(pipe, attention="original")
    assert [(s.component, s.transform) for s in report.applied] == [("image_processor", "device_postprocess")]
    assert processor.postprocess.__func__ is VaeImageProcessor.postprocess
    assert dict(vars(processor)) == before_vars
    assert_same(before, snapshot(pipe))
    assert pil_bytes(run_pil(pipe)) == expected and numpy_conversions  # diffusers' path again


def test_it_comes_with_the_default_options_and_stays_off_when_asked():
    pipe = sd_pipeline()
    assert any(s.transform == "device_postprocess" for s in diffopt.optimize(pipe, compile=False).applied)
    diffopt.optimize(pipe, compile=False, device_postprocess=False)
    assert "postprocess" not in vars(pipe.image_processor)
    diffopt.restore(pipe)


def test_optimizing_twice_with_the_option_named_keeps_one_hook():
    pipe = sd_pipeline()
    for _ in range(2):
        diffopt.optimize(pipe, device_postprocess=True, **ONLY_POSTPROCESS)
    hook = vars(pipe.image_processor)["postprocess"]
    assert isinstance(hook, PostprocessOnDevice) and not hook.had_own
    assert len(vars(pipe.image_processor)["_diffopt_layers"]) == 1
    diffopt.restore(pipe)
    assert vars(pipe.image_processor).keys() == {"_internal_dict"}


def test_copies_and_pickles_carry_their_own_hook():
    pipe = sd_pipeline()
    expected = pil_bytes(run_pil(pipe, batch=1))
    diffopt.optimize(pipe, **ONLY_POSTPROCESS)
    for twin in (copy.deepcopy(pipe), pickle.loads(pickle.dumps(pipe))):
        assert vars(twin.image_processor)["postprocess"].owner is twin.image_processor
        assert pil_bytes(run_pil(twin, batch=1)) == expected
        diffopt.restore(twin)
        assert vars(twin.image_processor).keys() == {"_internal_dict"}
    assert isinstance(vars(pipe.image_processor)["postprocess"], PostprocessOnDevice)  # the original keeps its own


def test_pipelines_sharing_one_image_processor_optimize_and_restore_in_any_order():
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = sd_pipeline()
    other = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    other.image_processor = pipe.image_processor  # from_pipe builds a new one; share it on purpose
    for first, second in ((pipe, other), (other, pipe)):
        diffopt.optimize(first, **ONLY_POSTPROCESS)
        diffopt.optimize(second, **ONLY_POSTPROCESS)
        assert len(vars(pipe.image_processor)["_diffopt_layers"]) == 1  # re-optimizing replaced, never stacked
        diffopt.restore(first)
        diffopt.restore(second)
        assert vars(pipe.image_processor).keys() == {"_internal_dict"}


class OwnPostprocess(VaeImageProcessor):
    def postprocess(self, image, output_type="pil", do_denormalize=None):
        return super().postprocess(image, output_type, do_denormalize)


class CLIPLike:
    """An image processor of another library (some pipelines hold a transformers one under this name)."""


def _own_on_instance(processor):
    processor.numpy_to_pil = VaeImageProcessor.numpy_to_pil  # someone else's patch on the instance


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda pipe: setattr(pipe, "image_processor", OwnPostprocess()), ["OwnPostprocess", "its own postprocess"]),
        (lambda pipe: _own_on_instance(pipe.image_processor), ["its own numpy_to_pil"]),
        (lambda pipe: setattr(pipe, "image_processor", CLIPLike()), ["CLIPLike", "not diffusers' VaeImageProcessor"]),
    ],
    ids=["subclass", "instance-patch", "not-an-image-processor"],
)
def test_a_processor_that_makes_images_its_own_way_is_skipped_or_an_error_when_named(change, words):
    pipe = sd_pipeline()
    change(pipe)
    processor_vars = dict(vars(pipe.image_processor))
    report = diffopt.optimize(pipe, **ONLY_POSTPROCESS)
    (skip,) = report.skipped
    assert (skip.component, skip.transform) == ("image_processor", "device_postprocess")
    assert all(word in skip.detail for word in words), skip.detail
    assert dict(vars(pipe.image_processor)) == processor_vars

    before = snapshot(pipe)
    with pytest.raises(ValueError, match="device_postprocess=True") as info:
        diffopt.optimize(pipe, device_postprocess=True)
    assert all(word in str(info.value) for word in words)
    assert_same(before, snapshot(pipe))
    assert dict(vars(pipe.image_processor)) == processor_vars


def test_an_image_processor_without_attributes_is_skipped_and_restore_runs():
    pipe = sd_pipeline()
    pipe.image_processor = object()  # nothing can be recorded on it, so restore must not look there
    (skip,) = diffopt.optimize(pipe, **ONLY_POSTPROCESS).skipped
    assert "not diffusers' VaeImageProcessor" in skip.detail
    diffopt.restore(pipe)


def test_a_pipeline_without_an_image_processor_gets_no_line_unless_named():
    pipe = sd_pipeline()
    pipe.image_processor = None
    assert not [s for s in diffopt.optimize(pipe, **ONLY_POSTPROCESS).steps if s.transform == "device_postprocess"]
    with pytest.raises(ValueError, match="has no image_processor"):
        diffopt.optimize(pipe, device_postprocess=True, **ONLY_POSTPROCESS)


def test_a_bare_model_gets_no_step_and_no_line_unless_named():
    unet = tiny_unet()
    report = diffopt.optimize(unet, compile=False)
    assert not [s for s in report.steps if s.transform == "device_postprocess"]
    diffopt.restore(unet)
    before = snapshot(unet)
    with pytest.raises(ValueError, match="device_postprocess=True needs a pipeline .* got UNet2DConditionModel"):
        diffopt.optimize(unet, compile=False, device_postprocess=True)
    assert_same(before, snapshot(unet))


def test_a_diffusers_without_the_reused_method_skips_with_the_version_or_raises_when_named(monkeypatch):
    monkeypatch.delattr(VaeImageProcessor, "_denormalize_conditionally")
    pipe = sd_pipeline()
    (skip,) = diffopt.optimize(pipe, **ONLY_POSTPROCESS).skipped
    assert "_denormalize_conditionally" in skip.detail and "diffusers 0." in skip.detail
    with pytest.raises(diffopt.UnsupportedFeatureError, match="_denormalize_conditionally"):
        diffopt.optimize(pipe, device_postprocess=True)


@pytest.mark.parametrize("value, error", [("yes", TypeError), (1, TypeError), (None, TypeError)])
def test_a_bad_value_is_rejected_before_anything_changes(value, error):
    pipe = sd_pipeline()
    before, processor_vars = snapshot(pipe), dict(vars(pipe.image_processor))
    with pytest.raises(error, match=f"device_postprocess must be True or False, got {value!r}"):
        diffopt.optimize(pipe, device_postprocess=value)
    assert_same(before, snapshot(pipe))
    assert dict(vars(pipe.image_processor)) == processor_vars

"""Timing of one benchmark cell (pipeline x batch size x recipe), and the eager reference it is compared with.

Method, the same for every cell so that numbers compare:

* a fresh pipeline per cell, the previous one freed (gc, ``torch.cuda.empty_cache``, ``torch.compiler.reset``);
* ``warmup`` calls (the first one timed on its own: it includes compilation), then ``repeats`` timed calls;
  each call is the whole pipeline ``__call__`` with ``output_type="latent"`` (``"pt"`` for IF I/II, which have
  no VAE), under ``torch.inference_mode``, between two ``torch.cuda.synchronize``;
* steps/s = denoising steps / median seconds of those calls;
* end to end, what a user waits for from ``pipe(...)`` to PIL images: one call with ``output_type="pil"`` that
  runs the decode and post-processing for the first time (``first_decode_call_s``; it compiles the VAE where the
  recipe compiles it, and its images are those PSNR and SSIM compare), then ``repeats`` timed calls to PIL images;
  ``end_to_end_s`` = their median;
* where that time goes: ``repeats`` more calls to PIL images, with the pipeline's ``vae.decode`` and its
  post-processing to PIL (``image_processor.postprocess``; ``numpy_to_pil`` for IF I/II) wrapped, for these calls
  only, so that each runs between two synchronizations and is timed (:mod:`diffopt.bench.split`); ``decode_s``,
  ``postprocess_s`` and ``loop_s`` (the rest of the call: mostly the denoising loop, with the input, prompt
  embedding and latent preparation and the scheduler's host work) are medians over them. They are calls of their
  own so that the wrappers' extra synchronizations change none of the timed calls;
* the recipe's own time (``optimize_s``: ``diffopt.optimize``, or wrapping in ``torch.compile``) is timed apart from
  the build; time to the first image = ``optimize_s`` + the first calls of the stages + what their first calls
  to PIL images took beyond a steady one (a compiled decoder compiles then);
* when the run has a next batch size, one more call at that batch size on the same optimized pipeline, after
  everything else of the cell (so that it changes neither the timed calls nor the peak memory): the "new shape"
  first call, what a user pays (a recompile, for compiled recipes) the first time a new batch size comes in.

The reference (:func:`probe`) is an eager pipeline with diffusers' defaults, run once per pipeline x batch size:
it counts the steps the pipeline really runs (img2img runs ``strength`` x steps), counts the FLOPs of one step
of the denoisers with ``torch.utils.flop_counter`` and keeps the output every recipe's output is compared with
(relative L2 of the timed calls' output), plus one more call's decoded images for the PSNR and SSIM of each
recipe's first decode call (:mod:`diffopt.bench.image_quality`).
"""
from __future__ import annotations

import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from diffopt.bench.env import OutOfMemoryError, free_memory, peak_memory_bytes, reset_peak_memory, sync
from diffopt.bench.image_quality import pixels, psnr, ssim
from diffopt.bench.pipelines import BenchCase, Stage, build_case
from diffopt.bench.recipes import Recipe
from diffopt.bench.split import DECODE, POSTPROCESS, split_targets, timed_methods
from diffopt.components import find_components
from diffopt.transforms.compile import wait_for_background_compiles


@dataclass
class StageReference:
    label: str
    steps: int
    flops_per_step: Optional[float]
    output: Any = field(default=None, repr=False)  # CPU float32 tensor; not written to results.json
    image: Any = field(default=None, repr=False)  # decoded uint8 pixels (N, H, W, C); not written either


@dataclass
class Reference:
    pipeline: str
    batch_size: int
    stages: list[StageReference] = field(default_factory=list)
    error: Optional[str] = None


@dataclass
class StageResult:
    label: str  # "" for one-stage pipelines, "I" / "II" / "III" for IF
    batch_size: int
    steps: int
    first_call_s: float
    times_s: list[float]
    median_s: float
    steps_per_s: float
    #: Median seconds of ``repeats`` calls to PIL images (``output_type="pil"``), what a user waits for; each of
    #: them in ``end_to_end_times_s``. Results written before these calls were timed hold one such call here.
    end_to_end_s: Optional[float] = None
    end_to_end_times_s: Optional[list[float]] = None
    #: The first call to PIL images, before the timed ones: it runs the VAE decode (and post-processing) for the
    #: first time, which compiles it where the recipe compiles the VAE. Its images give PSNR and SSIM.
    first_decode_call_s: Optional[float] = None
    #: Where an end-to-end call goes, medians over ``repeats`` more calls timed with :mod:`diffopt.bench.split`'s
    #: wrappers: ``decode_s`` in ``vae.decode`` (None without a VAE: IF stages I and II), ``postprocess_s`` in
    #: turning the decoded tensor into PIL images, and ``loop_s`` everything else in the call, the call's
    #: seconds minus those two: the denoising loop, and also input checks, preparing the prompt embeddings and
    #: latents, scheduler set-up and the pipeline's other host work; in fp16, SDXL's and the x4 upscaler's casts
    #: of the VAE to float32 and back around the decode (diffusers' ``force_upcast``) too.
    loop_s: Optional[float] = None
    decode_s: Optional[float] = None
    postprocess_s: Optional[float] = None
    #: The first call at the run's next batch size on the same optimized pipeline (no rebuild), and that size;
    #: None for the last batch size and for stages that always run at batch 1 (IF's upscalers).
    new_shape_batch_size: Optional[int] = None
    new_shape_first_call_s: Optional[float] = None
    #: --warm-start: the first call in a new process that loaded what this cell's compile saved.
    warm_first_call_s: Optional[float] = None
    flops_per_step: Optional[float] = None
    mfu: Optional[float] = None
    relative_l2: Optional[float] = None
    psnr_db: Optional[float] = None  # decoded images against the reference's; inf when identical
    ssim: Optional[float] = None  # the same images' structural similarity; 1.0 when identical


@dataclass
class CellResult:
    pipeline: str
    batch_size: int
    recipe: str
    status: str = "ok"  # "ok" | "oom" | "error" | "interrupted"
    error: Optional[str] = None
    traceback: Optional[str] = None
    build_s: Optional[float] = None
    #: Seconds the recipe took to apply (diffopt.optimize, torch.compile wrapping), every stage together.
    optimize_s: Optional[float] = None
    peak_memory_bytes: Optional[int] = None
    notes: list[str] = field(default_factory=list)
    stages: list[StageResult] = field(default_factory=list)
    #: Images after which this recipe's total time is below eager sdpa's (see diffopt.bench.first_image); None
    #: when it never is, or when the run has no eager sdpa cell of the same pipeline and batch size.
    break_even_images: Optional[int] = None
    #: --warm-start: the recipe applied again in a new process with empty inductor and triton caches and the
    #: compile cache this cell filled (its first calls are the stages' ``warm_first_call_s``), or why that failed.
    warm_optimize_s: Optional[float] = None
    warm_error: Optional[str] = None
    warm_break_even_images: Optional[int] = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class CellSettings:
    size: str
    device: torch.device
    dtype: torch.dtype
    steps: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    weights: Optional[str] = None
    warmup: int = 3
    repeats: int = 3
    stages: Optional[list[str]] = None

    def build(self, pipeline: str) -> BenchCase:
        return build_case(
            pipeline,
            size=self.size,
            device=self.device,
            dtype=self.dtype,
            steps=self.steps,
            height=self.height,
            width=self.width,
            weights=self.weights,
            stages=self.stages,
        )


def _batch(stage: Stage, batch_size: int) -> int:
    return 1 if stage.single_batch else batch_size


def _timed(stage: Stage, batch_size: int, output_type: str, device: torch.device):
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        output = stage.call(batch_size, output_type)
    sync(device)
    return time.perf_counter() - start, output


def _to_cpu(output) -> Optional[torch.Tensor]:
    return output.detach().float().cpu() if isinstance(output, torch.Tensor) else None


def relative_l2(output: Optional[torch.Tensor], reference: Optional[torch.Tensor]) -> Optional[float]:
    """||output - reference|| / ||reference||, or None when either is missing or the shapes differ."""
    if output is None or reference is None or output.shape != reference.shape:
        return None
    norm = reference.norm().item()
    difference = (output - reference).norm().item()
    return difference / norm if norm > 0 else difference


def _count_flops(module: torch.nn.Module, args, kwargs) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(*args, **kwargs)
    return float(counter.get_total_flops())


def _probe_stage(stage: Stage, batch_size: int, device: torch.device) -> StageReference:
    calls: dict[str, int] = {}
    first_inputs: dict[str, tuple] = {}
    denoisers = stage.denoisers()

    def recorder(name):
        def hook(module, args, kwargs):
            calls[name] = calls.get(name, 0) + 1
            first_inputs.setdefault(name, (args, kwargs))

        return hook

    handles = [
        module.register_forward_pre_hook(recorder(name), with_kwargs=True)
        for name, module in denoisers.items()
    ]
    try:
        _, output = _timed(stage, _batch(stage, batch_size), stage.timed_output, device)
    finally:
        for handle in handles:
            handle.remove()
    # One more eager call, decoded: what PSNR compares each recipe's decoded images with.
    _, decoded = _timed(stage, _batch(stage, batch_size), "pil", device)
    # Classifier-free guidance runs the UNet (or transformer) once per step on the doubled batch, so its
    # calls = steps.
    steps = calls.get("unet", calls.get("transformer", stage.steps))
    flops = sum(
        _count_flops(module, *first_inputs[name]) for name, module in denoisers.items() if name in first_inputs
    )
    return StageReference(stage.label, steps, flops or None, _to_cpu(output), pixels(decoded))


def probe(pipeline: str, batch_sizes: list[int], settings: CellSettings) -> list[Reference]:
    """The eager reference of ``pipeline`` for each batch size; errors are recorded, never raised."""
    free_memory(settings.device)
    references = [Reference(pipeline, batch_size) for batch_size in batch_sizes]
    case = None
    try:
        case = settings.build(pipeline)
        for reference in references:
            try:
                for stage in case.stages:
                    reference.stages.append(_probe_stage(stage, reference.batch_size, settings.device))
            except Exception as error:  # noqa: BLE001 - an OOM at batch 16 must not lose batch 1
                reference.error = _describe(error, "reference call")
                free_memory(settings.device)
    except Exception as error:  # noqa: BLE001
        for reference in references:
            reference.error = reference.error or _describe(error, "reference build")
    finally:
        del case
        free_memory(settings.device)
    return references


class _Phase:
    """Where a cell is, so that an error says in which call it happened (``"timed calls (stage II)"``)."""

    def __init__(self, name: str = "build"):
        self.name = name


def measure_cell(
    pipeline: str,
    batch_size: int,
    recipe: Recipe,
    settings: CellSettings,
    reference: Optional[Reference] = None,
    next_batch_size: Optional[int] = None,
) -> CellResult:
    """Build ``pipeline``, apply ``recipe`` and time it; any exception (OOM included) is recorded in the cell.

    ``next_batch_size``: after the cell's own calls, time one call at this batch size on the same pipeline (the
    stages' ``new_shape_first_call_s``); its failure is a note, not the cell's failure.

    Example:
        >>> from diffopt.bench.recipes import resolve
        >>> settings = CellSettings(size="tiny", device=torch.device("cpu"), dtype=torch.float32, steps=1)
        >>> cell = measure_cell("sd-txt2img", 1, resolve("sdpa"), settings)
        >>> cell.status, cell.stages[0].steps
        ('ok', 1)
    """
    device = settings.device
    cell = CellResult(pipeline, batch_size, recipe.name)
    free_memory(device)
    case, phase = None, _Phase("build")
    try:
        start = time.perf_counter()
        case = settings.build(pipeline)
        cell.build_s = time.perf_counter() - start
        phase.name = "recipe"
        start = time.perf_counter()
        for stage in case.stages:
            note = recipe.apply(stage.pipe)
            if note:
                cell.notes.append(f"{stage.label}: {note}" if stage.label else str(note))
        sync(device)
        cell.optimize_s = time.perf_counter() - start
        reset_peak_memory(device)
        references = reference.stages if reference is not None and not reference.error else []
        for index, stage in enumerate(case.stages):
            stage_reference = references[index] if index < len(references) else None
            _measure_stage(stage, batch_size, settings, stage_reference, phase, into=cell.stages)
        cell.peak_memory_bytes = peak_memory_bytes(device)
        if next_batch_size is not None:
            _measure_new_shape(case, cell, next_batch_size, device, phase)
    # A failing cell (OOM included) must not end the run; Ctrl-C ends it, but keeps the stages this cell finished.
    except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001
        cell.status = _status(error)
        cell.error = _describe(error, phase.name)
        cell.traceback = traceback.format_exc()
        cell.peak_memory_bytes = peak_memory_bytes(device)
    finally:
        del case
        free_memory(device)
    return cell


def _measure_stage(
    stage, batch_size, settings: CellSettings, reference: Optional[StageReference], phase: _Phase, into: list
) -> None:
    """Time ``stage`` and append its :class:`StageResult` to ``into`` as soon as the denoising loop's speed is known,
    so that a cell stopped later, in its calls to PIL images, still reports that speed."""
    device, batch, repeats = settings.device, _batch(stage, batch_size), max(settings.repeats, 1)
    suffix = f" (stage {stage.label})" if stage.label else ""
    phase.name = "first call" + suffix
    first_s, _ = _timed(stage, batch, stage.timed_output, device)
    # A recipe with background_compile ran its first call uncompiled; the timed calls are the compiled ones.
    phase.name = "background compile" + suffix
    wait_for_background_compiles(component.module for component in find_components(stage.pipe))
    phase.name = "warmup" + suffix
    for _ in range(max(settings.warmup - 1, 0)):
        _timed(stage, batch, stage.timed_output, device)
    phase.name = "timed calls" + suffix
    times, output = [], None
    for _ in range(repeats):
        seconds, output = _timed(stage, batch, stage.timed_output, device)
        times.append(seconds)
    median = statistics.median(times)
    steps = reference.steps if reference else stage.steps
    result = StageResult(
        label=stage.label,
        batch_size=batch,
        steps=steps,
        first_call_s=first_s,
        times_s=times,
        median_s=median,
        steps_per_s=steps / median,
        flops_per_step=reference.flops_per_step if reference else None,
        relative_l2=relative_l2(_to_cpu(output), reference.output if reference else None),
    )
    into.append(result)
    phase.name = "first decode call" + suffix
    result.first_decode_call_s, decoded = _timed(stage, batch, "pil", device)
    result.psnr_db = psnr(pixels(decoded), reference.image if reference else None)
    result.ssim = ssim(pixels(decoded), reference.image if reference else None, device=device)
    phase.name = "end-to-end calls" + suffix
    result.end_to_end_times_s = [_timed(stage, batch, "pil", device)[0] for _ in range(repeats)]
    result.end_to_end_s = statistics.median(result.end_to_end_times_s)
    phase.name = "split calls" + suffix
    split = median_split([split_call(stage, batch, device) for _ in range(repeats)])
    result.loop_s, result.decode_s, result.postprocess_s = split.loop_s, split.decode_s, split.postprocess_s


@dataclass
class CallSplit:
    """Seconds of one call to PIL images, or medians of several (see :class:`StageResult`)."""

    total_s: float
    loop_s: float
    decode_s: Optional[float]
    postprocess_s: Optional[float]


def split_call(stage: Stage, batch_size: int, device: torch.device) -> CallSplit:
    """One call to PIL images with the stage's decode and post-processing timed apart (:mod:`diffopt.bench.split`);
    a part the pipeline lacks, or did not call, is None. Its wrappers are gone when this returns or raises."""
    with timed_methods(split_targets(stage.pipe), device) as seconds:
        total_s, _ = _timed(stage, batch_size, "pil", device)
    decode_s, postprocess_s = (sum(seconds[part]) if seconds.get(part) else None for part in (DECODE, POSTPROCESS))
    loop_s = total_s - (decode_s or 0.0) - (postprocess_s or 0.0)
    return CallSplit(total_s, loop_s, decode_s, postprocess_s)


def median_split(calls: list[CallSplit]) -> CallSplit:
    """Each part's median over ``calls`` (so the parts need not add up to the median total exactly); a part
    missing from any call is None."""

    def median(part: str) -> Optional[float]:
        values = [getattr(call, part) for call in calls]
        return None if any(value is None for value in values) else statistics.median(values)

    return CallSplit(median("total_s"), median("loop_s"), median("decode_s"), median("postprocess_s"))


def _measure_new_shape(case: BenchCase, cell: CellResult, batch_size: int, device: torch.device, phase: _Phase):
    """One call per stage at ``batch_size`` on the pipelines the cell already optimized and ran."""
    for stage, result in zip(case.stages, cell.stages):
        batch = _batch(stage, batch_size)
        if batch == result.batch_size:  # a stage that always runs at batch 1: no new shape
            continue
        phase.name = f"new-shape call at batch {batch}" + (f" (stage {stage.label})" if stage.label else "")
        try:
            result.new_shape_first_call_s, _ = _timed(stage, batch, stage.timed_output, device)
            result.new_shape_batch_size = batch
        except Exception as error:  # noqa: BLE001 - the cell's own numbers stand; an OOM at batch 16 is a note
            cell.notes.append(_describe(error, phase.name))
            free_memory(device)
            return


def _status(error: BaseException) -> str:
    if isinstance(error, OutOfMemoryError):
        return "oom"
    return "interrupted" if isinstance(error, KeyboardInterrupt) else "error"


def _oom_phase(phase: str) -> str:
    # The docs page's words: "OOM after warmup" is an OOM in the timed calls.
    if phase.startswith("timed calls"):
        return "after warmup" + phase[len("timed calls") :]
    return f"in {phase}"


def _describe(error: BaseException, phase: str) -> str:
    if isinstance(error, OutOfMemoryError):
        return "OOM " + _oom_phase(phase)
    if isinstance(error, KeyboardInterrupt):
        return f"interrupted in {phase}"
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__} in {phase}: {first_line[:300]}"


def add_mfu(cell: CellResult, peak_flops: Optional[float]) -> None:
    """MFU = denoiser FLOPs per step x steps/s / the measured matmul peak (a lower bound: the whole pipeline
    call is timed, scheduler and Python overhead included)."""
    if not peak_flops:
        return
    for stage in cell.stages:
        if stage.flops_per_step:
            stage.mfu = stage.flops_per_step * stage.steps_per_s / peak_flops

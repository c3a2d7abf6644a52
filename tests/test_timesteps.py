"""Timesteps kept on the CPU (transforms/timesteps.py): the scheduler hook, the timestep hand-over to compiled
modules, and when optimize applies it. What it buys (no GPU sync per step) is shown in test_gpu.py and by the bench."""
import inspect

import pytest
import torch
from conftest import flux_pipeline, run_pipeline, sd_pipeline, tiny_controlnet

import diffopt
from diffopt import api
from diffopt.transforms.timesteps import apply_cpu_timesteps, scalars_to_device


def _schedulers():
    # Those that read their timesteps every step; Euler keeps its sigmas on the CPU already (it cannot even
    # be asked for "meta" timesteps, which is why its test below only runs with the hook on).
    from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler, PNDMScheduler, TCDScheduler

    return [DDIMScheduler(), PNDMScheduler(), DDPMScheduler(), LCMScheduler(), TCDScheduler()]


@pytest.mark.parametrize("scheduler", _schedulers(), ids=lambda s: type(s).__name__)
def test_set_timesteps_puts_them_on_the_cpu_whatever_device_is_asked_and_undo_restores(scheduler):
    original_signature = inspect.signature(scheduler.set_timesteps)
    scheduler.set_timesteps(10, device="meta")
    assert scheduler.timesteps.device.type == "meta"  # the hook below is what changes it
    scheduler.set_timesteps(10, device="cpu")
    reference = scheduler.timesteps.clone()

    change = apply_cpu_timesteps(scheduler)
    # retrieve_timesteps reads this signature to decide which arguments to pass
    assert inspect.signature(scheduler.set_timesteps) == original_signature
    scheduler.set_timesteps(10, device="meta")
    assert scheduler.timesteps.device.type == "cpu" and torch.equal(scheduler.timesteps, reference)
    scheduler.set_timesteps(10, "meta")  # positional device, as some pipelines pass it
    assert scheduler.timesteps.device.type == "cpu"

    change.undo()
    assert "set_timesteps" not in vars(scheduler)
    scheduler.set_timesteps(10, device="meta")
    assert scheduler.timesteps.device.type == "meta"


def test_euler_under_the_hook_gets_cpu_timesteps_and_sigmas():
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler()
    apply_cpu_timesteps(scheduler)
    scheduler.set_timesteps(num_inference_steps=10, device="meta")
    assert scheduler.timesteps.device.type == "cpu" and len(scheduler.timesteps) == 10


def test_scalars_to_device_moves_small_cpu_timesteps_and_keeps_values_and_dtype():
    timestep, expanded, distinct = torch.tensor(981), torch.tensor(981.0).expand(3), torch.tensor([1.0, 2.0])
    image, big, number = torch.zeros(1, 3, 8, 8), torch.zeros(5000), 7
    on_meta = torch.empty((), device="meta")
    args, kwargs = scalars_to_device((timestep, expanded, distinct, image, big, number), {"t": on_meta}, "meta")
    assert [a.device.type for a in args[:3]] == ["meta"] * 3  # t, t.expand(batch) (DreamLite), anything small
    assert (args[0].dtype, args[1].shape, args[2].shape) == (torch.int64, (3,), (2,))
    assert args[3] is image and args[4] is big and args[5] is number and kwargs["t"] is on_meta
    (moved, moved_batch, moved_distinct), _ = scalars_to_device((timestep, expanded, distinct), {}, "cpu")
    assert moved is not timestep and moved.item() == 981 and moved.dtype == torch.int64  # the host value is kept
    assert torch.equal(moved_batch, expanded) and torch.equal(moved_distinct, distinct)


def test_hooked_scheduler_deep_copies_into_an_independent_hooked_scheduler():
    import copy

    from diffusers import DDIMScheduler

    # TextToVideoZero deep-copies its scheduler on every call: the copy must set its own timesteps.
    scheduler = DDIMScheduler()
    apply_cpu_timesteps(scheduler)
    copied = copy.deepcopy(scheduler)
    copied.set_timesteps(4, device="meta")
    scheduler.set_timesteps(10, device="meta")
    assert (len(copied.timesteps), len(scheduler.timesteps)) == (4, 10)
    assert copied.timesteps.device.type == "cpu"


def test_a_compiled_unet_fed_cpu_timesteps_gives_the_same_latents():
    # End to end on the CPU: the hook and the compiled call's conversion in a real pipeline loop (DDIM reads the
    # timesteps on the CPU, the UNet gets them re-made by the fill) change nothing in the output.
    from diffopt.transforms.compile import apply_compile

    pipe = sd_pipeline()
    expected = run_pipeline(pipe, steps=3)
    hook = apply_cpu_timesteps(pipe.scheduler)
    compiled = apply_compile(pipe.unet, {"backend": "eager", "fullgraph": True}, scalars_to=torch.device("cpu"))
    assert torch.equal(run_pipeline(pipe, steps=3), expected)
    compiled.undo()
    hook.undo()


@pytest.fixture
def pretend_cuda(monkeypatch):
    """Plan as if the modules were on a CUDA card; nothing here calls them, so no card is needed."""
    from diffopt.transforms import compile as compile_transform
    from diffopt.transforms import timesteps

    for module in (compile_transform, timesteps):
        monkeypatch.setattr(module, "execution_device", lambda module: torch.device("cuda"))


def _entries(report, transform):
    return [(e.component, e.status, e.detail) for e in report.steps if e.transform == transform]


def test_on_cuda_optimize_keeps_timesteps_on_cpu_and_compiled_unet_and_controlnet_take_them(pretend_cuda):
    pipe = sd_pipeline(controlnet=tiny_controlnet())
    report = diffopt.optimize(pipe)
    assert _entries(report, "cpu_timesteps") == [
        ("scheduler", "applied", "DDIMScheduler keeps its timesteps on the CPU: reading them never waits for the GPU")
    ]
    compiled = dict((c, d) for c, s, d in _entries(report, "compile"))
    assert set(compiled) == {"unet", "controlnet"}
    assert all("CPU timesteps made on cuda" in detail for detail in compiled.values()), compiled
    pipe.scheduler.set_timesteps(5, device="meta")
    assert pipe.scheduler.timesteps.device.type == "cpu"

    diffopt.restore(pipe)
    assert "set_timesteps" not in vars(pipe.scheduler)
    pipe.scheduler.set_timesteps(5, device="meta")
    assert pipe.scheduler.timesteps.device.type == "meta"


def test_where_it_does_not_fit_it_stays_off_silently_and_naming_it_is_an_error(pretend_cuda):
    from diffusers import UNet2DConditionModel

    pipe = sd_pipeline()
    report = diffopt.optimize(pipe, compile=False)
    assert _entries(report, "cpu_timesteps") == [] and "set_timesteps" not in vars(pipe.scheduler)
    diffopt.restore(pipe)

    processors = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    with pytest.raises(ValueError, match=r"cpu_timesteps=True: unet is not compiled by diffopt"):
        diffopt.optimize(pipe, compile=False, cpu_timesteps=True)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == processors  # untouched
    assert "set_timesteps" not in vars(pipe.scheduler) and not api.is_optimized(pipe)

    with pytest.raises(ValueError, match=r"cpu_timesteps=True: FluxTransformer2DModel takes a batch of timesteps"):
        diffopt.optimize(flux_pipeline(), compile=False, cpu_timesteps=True)
    assert _entries(diffopt.optimize(flux_pipeline(), compile=False), "cpu_timesteps") == []
    with pytest.raises(ValueError, match=r"needs a pipeline .* got UNet2DConditionModel"):
        diffopt.optimize(sd_pipeline().unet, compile=False, cpu_timesteps=True)
    assert isinstance(pipe.unet, UNet2DConditionModel)


@pytest.mark.parametrize("name", ["LCMScheduler", "TCDScheduler"])
def test_few_step_schedulers_are_planned_onto_the_cpu_too(pretend_cuda, name):
    # LCM and TCD read their timesteps in every step() as DDIM does (previous timestep, boundary conditions).
    import diffusers

    pipe = sd_pipeline()
    pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config)
    report = diffopt.optimize(pipe)
    assert _entries(report, "cpu_timesteps") == [
        ("scheduler", "applied", f"{name} keeps its timesteps on the CPU: reading them never waits for the GPU")
    ]
    pipe.scheduler.set_timesteps(4, device="meta")
    assert pipe.scheduler.timesteps.device.type == "cpu"
    diffopt.restore(pipe)
    pipe.scheduler.set_timesteps(4, device="meta")
    assert pipe.scheduler.timesteps.device.type == "meta"


def test_schedulers_that_do_not_wait_are_left_alone(pretend_cuda):
    from diffusers import EulerDiscreteScheduler

    pipe = sd_pipeline()
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert _entries(diffopt.optimize(pipe), "cpu_timesteps") == [] and "set_timesteps" not in vars(pipe.scheduler)
    with pytest.raises(ValueError, match=r"EulerDiscreteScheduler does not read its timesteps every step.*DDIMScheduler"):
        diffopt.optimize(pipe, cpu_timesteps=True)


def test_optimize_again_with_cpu_timesteps_named_replaces_the_first(pretend_cuda):
    # The dry run of the second call sees the UNet compiled by the first, which it will undo: not "compiled
    # outside diffopt".
    pipe = sd_pipeline()
    diffopt.optimize(pipe, cpu_timesteps=True)
    report = diffopt.optimize(pipe, cpu_timesteps=True)
    assert [e[1] for e in _entries(report, "cpu_timesteps")] == ["applied"]
    with pytest.raises(ValueError, match="not compiled by diffopt"):
        diffopt.optimize(pipe, compile=False, cpu_timesteps=True)
    assert "set_timesteps" in vars(pipe.scheduler)  # the failed call left the second optimize in place
    diffopt.restore(pipe)
    assert "set_timesteps" not in vars(pipe.scheduler)


def test_on_cpu_there_is_nothing_to_wait_for_so_it_is_silent_unless_named():
    pipe = sd_pipeline()
    assert _entries(diffopt.optimize(pipe, compile=False), "cpu_timesteps") == []
    (entry,) = _entries(diffopt.optimize(pipe, compile=False, cpu_timesteps=True), "cpu_timesteps")
    assert entry[1] == "skipped" and "runs on cpu" in entry[2]
    assert "set_timesteps" not in vars(pipe.scheduler)


def test_cpu_timesteps_must_be_a_bool():
    with pytest.raises(TypeError, match=r"cpu_timesteps must be True or False, got 'yes'"):
        diffopt.optimize(sd_pipeline(), cpu_timesteps="yes")

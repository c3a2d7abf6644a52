"""Timesteps kept on the CPU (transforms/timesteps.py): the scheduler hook, the timestep hand-over to compiled
modules, and when optimize applies it. What it buys (no GPU sync per step) is shown in test_gpu.py and by the bench."""
import inspect

import pytest
import torch
from conftest import flux_pipeline, sd_pipeline, tiny_controlnet

import diffopt
from diffopt import api
from diffopt.transforms.timesteps import apply_cpu_timesteps, scalars_to_device


def _schedulers():
    # The three that read their timesteps every step; Euler keeps its sigmas on the CPU already (it cannot even
    # be asked for "meta" timesteps, which is why its test below only runs with the hook on).
    from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler

    return [DDIMScheduler(), PNDMScheduler(), DDPMScheduler()]


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


def test_scalars_to_device_moves_only_0d_cpu_tensors_and_keeps_value_and_dtype():
    timestep, batch, number = torch.tensor(981), torch.tensor([1.0, 2.0]), 7
    on_meta = torch.empty((), device="meta")
    args, kwargs = scalars_to_device((timestep, batch, number), {"timestep": torch.tensor(0.5), "m": on_meta}, "meta")
    assert args[0].device.type == "meta" and args[0].dtype == torch.int64
    assert args[1] is batch and args[2] is number  # a batch of timesteps would need a real copy: left alone
    assert kwargs["timestep"].device.type == "meta" and kwargs["timestep"].dtype == torch.float32
    assert kwargs["m"] is on_meta
    (moved,), _ = scalars_to_device((timestep,), {}, "cpu")  # the host value is what the fill writes
    assert moved is not timestep and moved.item() == 981 and moved.dtype == torch.int64


@pytest.fixture
def pretend_cuda(monkeypatch):
    """Plan as if the modules were on a CUDA card; nothing here calls them, so no card is needed."""
    monkeypatch.setattr(api, "module_device", lambda module: torch.device("cuda"))


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
    assert "set_timesteps" not in vars(pipe.scheduler) and not hasattr(pipe, api.STATE_ATTR)

    with pytest.raises(ValueError, match=r"cpu_timesteps=True: FluxTransformer2DModel takes a batch of timesteps"):
        diffopt.optimize(flux_pipeline(), compile=False, cpu_timesteps=True)
    assert _entries(diffopt.optimize(flux_pipeline(), compile=False), "cpu_timesteps") == []
    with pytest.raises(ValueError, match=r"needs a pipeline .* got UNet2DConditionModel"):
        diffopt.optimize(sd_pipeline().unet, compile=False, cpu_timesteps=True)
    assert isinstance(pipe.unet, UNet2DConditionModel)


def test_on_cpu_there_is_nothing_to_wait_for_so_it_is_silent_unless_named():
    pipe = sd_pipeline()
    assert _entries(diffopt.optimize(pipe, compile=False), "cpu_timesteps") == []
    (entry,) = _entries(diffopt.optimize(pipe, compile=False, cpu_timesteps=True), "cpu_timesteps")
    assert entry[1] == "skipped" and "runs on cpu" in entry[2]
    assert "set_timesteps" not in vars(pipe.scheduler)


def test_cpu_timesteps_must_be_a_bool():
    with pytest.raises(TypeError, match=r"cpu_timesteps must be True or False, got 'yes'"):
        diffopt.optimize(sd_pipeline(), cpu_timesteps="yes")

"""benchmarks/profile_call.py: one profiled call to PIL images, split into loop, decode and post-processing, and
(from a hand-written trace of the shape CUDA runs give) where the GPU is busy, idle and waited for."""
import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from conftest import vars_by_identity

from diffopt.bench.pipelines import build_case

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "profile_call.py"
_spec = importlib.util.spec_from_file_location("profile_call", SCRIPT)
profile_call = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_call)

CPU = torch.device("cpu")
#: Sleeps put into the decode and the post-processing, long enough to find on a busy CPU.
DECODE_SLEEP_S, POSTPROCESS_SLEEP_S = 0.1, 0.05
pytestmark = pytest.mark.usefixtures("steady_cpu")


def test_main_on_cpu_writes_a_split_that_adds_up_and_the_environment(tmp_path):
    argv = ["--pipelines", "sd-txt2img", "--recipes", "sdpa,diffopt:compile=False", "--size", "tiny", "--steps", "2",
            "--warmup", "1", "--device", "cpu", "--traces", "--out", str(tmp_path)]  # fmt: skip
    assert profile_call.main(argv) == 0
    report = json.loads((tmp_path / "profile.json").read_text())
    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["diffusers"]
    assert [(r["pipeline"], r["recipe"], r["status"]) for r in report["results"]] == [
        ("sd-txt2img", "sdpa", "ok"),
        ("sd-txt2img", "diffopt:compile=False", "ok"),
    ]
    for result in report["results"]:
        parts = result["parts"]
        assert set(parts) == {"loop", "decode", "postprocess"}
        assert all(parts[part]["wall_s"] > 0 for part in parts)
        assert sum(parts[part]["wall_s"] for part in parts) == pytest.approx(result["call_s"], rel=0.01)
        # The range named "call" is inside the seconds timed around it.
        assert 0 < result["call_s"] <= result["profiled_call_s"]
        assert result["gpu"] is None and result["top_cpu_ops"] and len(result["warm_calls_s"]) == 1
        assert (tmp_path / result["trace"]).stat().st_size > 0
    markdown = (tmp_path / "profile.md").read_text()
    assert "| recipe | part | wall ms | GPU busy ms | GPU idle ms | GPU launched ms | syncs |" in markdown
    assert "| diffopt:compile=False | decode |" in markdown


def test_profile_finds_each_part_where_it_is_and_leaves_the_pipeline_as_it_was():
    stage = build_case("sd-txt2img", size="tiny", steps=2).stages[0]
    pipe, calls = stage.pipe, []
    method = type(pipe.image_processor).postprocess

    def own_postprocess(*args, **kwargs):  # another library's hook: an instance attribute, slow
        calls.append(1)
        time.sleep(POSTPROCESS_SLEEP_S)
        return method(pipe.image_processor, *args, **kwargs)

    vars(pipe.image_processor)["postprocess"] = own_postprocess
    pipe.vae.decoder.register_forward_pre_hook(lambda module, args: time.sleep(DECODE_SLEEP_S))
    stage.call(1, "pil")  # the pipeline keeps some of a call's settings on itself
    before = [vars_by_identity(pipe.vae), vars_by_identity(pipe.image_processor), set(vars(pipe))]
    calls.clear()
    result = profile_call.profile_stage(stage, 1, CPU, warmup=1)
    assert calls == [1, 1]  # the warm-up call's and the profiled call's: the hook ran inside its label
    parts = result["parts"]
    assert DECODE_SLEEP_S <= parts["decode"]["wall_s"] < DECODE_SLEEP_S + 0.5 * result["call_s"]
    assert POSTPROCESS_SLEEP_S <= parts["postprocess"]["wall_s"] < POSTPROCESS_SLEEP_S + 0.5 * result["call_s"]
    assert 0 < parts["loop"]["wall_s"] < result["call_s"] - DECODE_SLEEP_S - POSTPROCESS_SLEEP_S
    assert [vars_by_identity(pipe.vae), vars_by_identity(pipe.image_processor), set(vars(pipe))] == before
    assert "decode" not in vars(pipe.vae) and vars(pipe.image_processor)["postprocess"] is own_postprocess


# --- the GPU timeline, from a hand-written trace -------------------------------------------------------------


def _x(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": 0 if cat in ("kernel", "gpu_memcpy", "gpu_memset",
            "gpu_user_annotation") else 1, "tid": tid, "ts": ts, "dur": dur, "args": args}  # fmt: skip


def _cuda_trace() -> dict:
    """A call of 1000 us: loop [0, 600) and [950, 1000), decode [600, 800), postprocess [800, 950). Kernel C, which
    the decode launches, runs from 700 to 900, into the post-processing."""
    events = [
        _x("user_annotation", "call", 0, 1000),
        _x("user_annotation", "decode", 600, 200),
        _x("user_annotation", "postprocess", 800, 150),
        # The same ranges drawn on the GPU's timeline: not work.
        _x("gpu_user_annotation", "call", 0, 1000),
        _x("gpu_user_annotation", "decode", 700, 200),
        # Loop: two kernels, an upload (under kernel A), a memset and a copy back with its synchronize.
        _x("cuda_runtime", "cudaLaunchKernel", 10, 5, correlation=1),
        _x("kernel", "kernel_a", 20, 100, correlation=1),
        _x("cuda_runtime", "cudaMemcpyAsync", 18, 2, correlation=7),
        _x("gpu_memcpy", "Memcpy HtoD (Pageable -> Device)", 25, 2, correlation=7),
        _x("cuda_runtime", "cudaLaunchKernel", 30, 5, correlation=2),
        _x("kernel", "kernel_b", 150, 100, correlation=2),
        _x("cuda_runtime", "cudaMemsetAsync", 255, 3, correlation=8),
        _x("gpu_memset", "Memset (Device)", 262, 10, correlation=8),
        _x("cuda_runtime", "cudaMemcpyAsync", 300, 60, correlation=3),
        _x("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 300, 5, correlation=3),
        _x("cuda_runtime", "cudaStreamSynchronize_v3020", 360, 10, correlation=4),
        # A graph launch whose kernels the profiler did not record.
        _x("cuda_runtime", "cudaGraphLaunch", 380, 5, correlation=9),
        # Decode launches kernel C; the post-processing copies the image back.
        _x("cuda_runtime", "cudaLaunchKernel", 610, 5, correlation=5),
        _x("kernel", "kernel_c", 700, 200, correlation=5),
        _x("cuda_runtime", "cudaMemcpyAsync", 810, 95, correlation=6),
        _x("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 900, 10, correlation=6),
    ]
    return {"traceEvents": [{"ph": "M", "name": "process_name", "pid": 0, "tid": 0, "args": {}}] + events}


def test_gpu_busy_idle_gaps_and_syncs_per_part_from_a_cuda_trace():
    result = profile_call.analyze(_cuda_trace())
    us = 1e-6
    parts, gpu = result["parts"], result["gpu"]
    assert result["call_s"] == pytest.approx(1000 * us)
    assert {part: parts[part]["wall_s"] for part in parts} == pytest.approx(
        {"loop": 650 * us, "decode": 200 * us, "postprocess": 150 * us}
    )
    # Busy: A (with the upload under it), B, the memset and the first copy in the loop; C's first half in the
    # decode, its second half and the last copy in the post-processing. The annotations drawn on the GPU are not.
    assert {part: parts[part]["gpu_busy_s"] for part in parts} == pytest.approx(
        {"loop": 215 * us, "decode": 100 * us, "postprocess": 110 * us}
    )
    assert {part: parts[part]["gpu_idle_s"] for part in parts} == pytest.approx(
        {"loop": 435 * us, "decode": 100 * us, "postprocess": 40 * us}
    )
    assert gpu["busy_s"] == pytest.approx(425 * us) and gpu["idle_s"] == pytest.approx(575 * us)
    # Launched: all of kernel C belongs to the decode, which launched it.
    assert {part: parts[part]["gpu_launched_s"] for part in parts} == pytest.approx(
        {"loop": 215 * us, "decode": 200 * us, "postprocess": 10 * us}
    )
    assert (parts["loop"]["d2h_copies"], parts["loop"]["h2d_copies"], parts["postprocess"]["d2h_copies"]) == (1, 1, 1)
    # The upload's cudaMemcpyAsync does not synchronize; the copies back and the stream synchronize do.
    assert parts["loop"]["sync_calls"] == {"cudaMemcpyAsync": 1, "cudaStreamSynchronize": 1}
    assert parts["loop"]["host_sync_wait_s"] == pytest.approx(70 * us)
    assert (parts["decode"]["syncs"], parts["postprocess"]["sync_calls"]) == (0, {"cudaMemcpyAsync": 1})
    gaps = [(gap["start_s"], gap["length_s"], gap["part"]) for gap in gpu["largest_idle_gaps"]]
    assert gaps[:2] == [
        pytest.approx((305 * us, 395 * us, "loop > decode")),
        pytest.approx((910 * us, 90 * us, "postprocess > loop")),
    ]
    assert len(gaps) == 5 and sum(gap[1] for gap in gaps) < gpu["idle_s"]
    assert gpu["idle_s_by_gap_length"] == pytest.approx(
        {"under 10 us": 0.0, "10-100 us": 180 * us, "0.1-1 ms": 395 * us, "1 ms and over": 0.0}
    )
    assert [(k["name"], k["count"]) for k in gpu["top_kernels"]] == [("kernel_c", 1), ("kernel_a", 1), ("kernel_b", 1)]
    assert gpu["kernels"] == 3
    assert result["warnings"] == [
        "1 of 1 CUDA graph launches have no device work in the trace: GPU busy seconds undercount"
    ]


def test_a_trace_without_the_call_range_is_refused():
    with pytest.raises(ValueError, match="no host range named 'call'"):
        profile_call.analyze({"traceEvents": [_x("cpu_op", "aten::add", 0, 5)]})


def test_the_markdown_of_a_cuda_call_has_its_gpu_columns_and_gaps():
    entry = dict(pipeline="sd-txt2img", stage="", recipe="sdpa", status="ok", **profile_call.analyze(_cuda_trace()),
                 warm_calls_s=[0.0009], top_cpu_ops=[{"name": "aten::conv2d", "self_s": 0.0002}])  # fmt: skip
    settings = {"size": "full", "dtype": "fp16", "batch_size": 1, "warmup": 2}
    environment = {"torch": "2.11", "diffusers": "0.42", "gpu": "NVIDIA H200"}
    markdown = profile_call.to_markdown({"settings": settings, "environment": environment, "results": [entry]})
    assert "torch 2.11, diffusers 0.42, NVIDIA H200; size full, fp16, batch 1" in markdown
    # ms: call 1.0, busy 0.425, idle 0.575, launched 0.215 + 0.2 + 0.01, syncs 2 + 0 + 1.
    assert "| sdpa | call | 1 | 0.425 | 0.575 | 0.425 | 3 |" in markdown
    assert "| sdpa | decode | 0.2 | 0.1 | 0.1 | 0.2 | 0 |" in markdown
    gaps = "largest GPU idle gaps: 0.395 ms at +0.305 ms (loop > decode), 0.09 ms at +0.91 ms (postprocess > loop)"
    assert gaps in markdown
    assert "warning: 1 of 1 CUDA graph launches" in markdown


def test_a_stage_without_a_vae_has_no_decode_part():
    first = build_case("if", size="tiny", steps=1, stages=["I"]).stages[0]
    result = profile_call.profile_stage(first, 1, CPU, warmup=1)
    assert result["parts_present"] == ["loop", "postprocess"] and result["warnings"] == []
    assert result["parts"]["decode"]["wall_s"] == 0 and result["parts"]["postprocess"]["wall_s"] > 0
    entry = dict(pipeline="if", stage="I", recipe="sdpa", status="ok", **result)
    settings = {"size": "tiny", "dtype": "fp32", "batch_size": 1, "warmup": 1}
    markdown = profile_call.to_markdown({"settings": settings, "environment": {}, "results": [entry]})
    assert "## if stage I" in markdown and "| sdpa | postprocess |" in markdown and "| sdpa | decode |" not in markdown

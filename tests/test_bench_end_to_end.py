"""End to end in the bench: repeated calls to PIL images, their split into loop, decode and post-processing, the
wrappers that time the split, and the end-to-end table."""
import json
import time

import pytest
import torch
from conftest import vars_by_identity

from diffopt.bench import output, recipes
from diffopt.bench.measure import CellResult, CellSettings, StageResult, measure_cell, split_call
from diffopt.bench.pipelines import build_case
from diffopt.bench.runner import BenchRun, BenchSettings, load_run
from diffopt.bench.split import labelled_methods, split_targets, timed_methods

CPU = torch.device("cpu")
#: Sleeps put into the decode and the post-processing: parts long and known enough to check on a busy CPU.
DECODE_SLEEP_S, POSTPROCESS_SLEEP_S = 0.2, 0.1
pytestmark = pytest.mark.usefixtures("steady_cpu")


def _own_postprocess(processor, calls: list, sleep_s: float = 0.0):
    """An instance attribute ``postprocess`` on ``processor``, as another library's hook would put there: it
    counts its calls, sleeps, and runs the class's method."""
    method = type(processor).postprocess

    def postprocess(*args, **kwargs):
        calls.append(1)
        time.sleep(sleep_s)
        return method(processor, *args, **kwargs)

    vars(processor)["postprocess"] = postprocess
    return postprocess


def _slow_decoder(vae, sleep_s: float):
    # A forward pre-hook on the decoder module: vars(vae) itself stays as diffusers built it.
    return vae.decoder.register_forward_pre_hook(lambda module, args: time.sleep(sleep_s))


# --- the wrappers --------------------------------------------------------------------------------------------


def test_wrappers_time_each_part_and_leave_vars_as_they_were():
    stage = build_case("sd-txt2img", size="tiny", steps=2).stages[0]
    pipe, calls = stage.pipe, []
    own = _own_postprocess(pipe.image_processor, calls)
    stage.call(1, "pil")  # the pipeline keeps some of a call's settings on itself (_guidance_scale...)
    calls.clear()
    before = [vars_by_identity(pipe.vae), vars_by_identity(pipe.image_processor), set(vars(pipe))]
    targets = split_targets(pipe)
    assert targets == {"decode": (pipe.vae, "decode"), "postprocess": (pipe.image_processor, "postprocess")}
    with timed_methods(targets, CPU) as seconds:
        assert "decode" in vars(pipe.vae) and vars(pipe.image_processor)["postprocess"] is not own
        stage.call(1, "pil")
    assert len(seconds["decode"]) == 1 and len(seconds["postprocess"]) == 1 and calls == [1]  # the hook still ran
    assert [vars_by_identity(pipe.vae), vars_by_identity(pipe.image_processor), set(vars(pipe))] == before
    assert vars(pipe.image_processor)["postprocess"] is own and "decode" not in vars(pipe.vae)


def test_wrappers_are_removed_when_the_call_raises():
    stage = build_case("sd-txt2img", size="tiny", steps=2).stages[0]
    pipe = stage.pipe
    own = _own_postprocess(pipe.image_processor, [])
    before = [vars_by_identity(pipe.vae), vars_by_identity(pipe.image_processor)]

    def explode(module, args):
        raise RuntimeError("decoder exploded")

    handle = pipe.vae.decoder.register_forward_pre_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="decoder exploded"):
            split_call(stage, 1, CPU)
    finally:
        handle.remove()
    assert [vars_by_identity(pipe.vae), vars_by_identity(pipe.image_processor)] == before
    assert vars(pipe.image_processor)["postprocess"] is own


def test_labels_name_each_part_in_a_profile_and_leave_vars_as_they_were():
    from torch.profiler import ProfilerActivity, profile

    stage = build_case("sd-txt2img", size="tiny", steps=1).stages[0]
    pipe, calls = stage.pipe, []
    own = _own_postprocess(pipe.image_processor, calls)
    stage.call(1, "pil")  # the pipeline keeps some of a call's settings on itself
    calls.clear()
    before = [vars_by_identity(pipe.vae), vars_by_identity(pipe.image_processor), set(vars(pipe))]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with labelled_methods(split_targets(pipe)) as parts:
            assert vars(pipe.image_processor)["postprocess"] is not own and "decode" in vars(pipe.vae)
            stage.call(1, "pil")
    assert parts == ["decode", "postprocess"] and calls == [1]  # the hook still ran, inside its label
    assert [vars_by_identity(pipe.vae), vars_by_identity(pipe.image_processor), set(vars(pipe))] == before
    assert vars(pipe.image_processor)["postprocess"] is own and "decode" not in vars(pipe.vae)
    ranges = {event.name: event for event in prof.events() if event.name in parts}
    assert set(ranges) == {"decode", "postprocess"}
    # The decoder's convolutions ran inside the decode's range, and the decode ended before the post-processing.
    decode, postprocess = ranges["decode"].time_range, ranges["postprocess"].time_range
    inside = [e for e in prof.events() if e.name == "aten::conv2d" and decode.start <= e.time_range.start <= decode.end]
    assert inside and decode.end <= postprocess.start


def test_labels_are_removed_when_the_call_raises_and_skip_what_cannot_be_replaced():
    stage = build_case("sd-txt2img", size="tiny", steps=1).stages[0]
    pipe = stage.pipe
    before = vars_by_identity(pipe.vae)

    class Slotted:
        __slots__ = ()

        def postprocess(self):
            return "slotted"

    targets = {**split_targets(pipe), "postprocess": (Slotted(), "postprocess")}

    def explode(module, args):
        raise RuntimeError("decoder exploded")

    handle = pipe.vae.decoder.register_forward_pre_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="decoder exploded"):
            with labelled_methods(targets) as parts:
                assert parts == ["decode"]  # no vars() on a __slots__ object: left alone
                stage.call(1, "pil")
    finally:
        handle.remove()
    assert vars_by_identity(pipe.vae) == before and "decode" not in vars(pipe.vae)


def test_if_stages_time_numpy_to_pil_where_they_have_no_vae():
    first, second, third = build_case("if", size="tiny", steps=1).stages
    for stage in (first, second):
        assert split_targets(stage.pipe) == {"postprocess": (stage.pipe, "numpy_to_pil")}
    assert set(split_targets(third.pipe)) == {"decode", "postprocess"}  # the x4 upscaler has a VAE
    first.call(1, "pil")  # the pipeline keeps some of a call's settings on itself
    before = set(vars(first.pipe))
    split = split_call(first, 1, CPU)
    assert split.decode_s is None and split.postprocess_s > 0 and split.loop_s > 0
    assert set(vars(first.pipe)) == before and "numpy_to_pil" not in vars(first.pipe)


# --- a measured cell -----------------------------------------------------------------------------------------


def test_split_of_a_cell_adds_up_to_its_end_to_end_calls(monkeypatch):
    pipes = []

    def slow_parts(pipe):
        # Known sleeps in the decode and the post-processing: the split must find them where they are.
        _slow_decoder(pipe.vae, DECODE_SLEEP_S)
        _own_postprocess(pipe.image_processor, [], POSTPROCESS_SLEEP_S)
        pipes.append((pipe, vars_by_identity(pipe.vae), vars_by_identity(pipe.image_processor)))

    monkeypatch.setitem(recipes.RECIPES, "slow-parts", slow_parts)
    settings = CellSettings(size="tiny", device=CPU, dtype=torch.float32, steps=2, warmup=1, repeats=3)
    cell = measure_cell("sd-txt2img", 1, recipes.resolve("slow-parts"), settings)
    assert cell.ok, cell.error
    (stage,) = cell.stages
    assert len(stage.end_to_end_times_s) == 3 and stage.end_to_end_s == sorted(stage.end_to_end_times_s)[1]
    assert stage.first_decode_call_s >= DECODE_SLEEP_S + POSTPROCESS_SLEEP_S
    assert DECODE_SLEEP_S <= stage.decode_s < DECODE_SLEEP_S + 0.5 * stage.end_to_end_s
    assert POSTPROCESS_SLEEP_S <= stage.postprocess_s < POSTPROCESS_SLEEP_S + 0.5 * stage.end_to_end_s
    assert stage.loop_s > 0
    # The split calls are other calls than the timed ones: their parts add up to about the same seconds.
    assert stage.loop_s + stage.decode_s + stage.postprocess_s == pytest.approx(stage.end_to_end_s, rel=0.25)
    pipe, vae_before, processor_before = pipes[0]
    assert vars_by_identity(pipe.vae) == vae_before and vars_by_identity(pipe.image_processor) == processor_before


# --- results.json and results.md -----------------------------------------------------------------------------


def _stage(label, end_to_end, batch=1, loop=None, decode=None, postprocess=None, times=True):
    return StageResult(label, batch, 10, 1.0, [0.5], 0.5, 20.0, end_to_end_s=end_to_end,
                       end_to_end_times_s=[end_to_end] if times else None, loop_s=loop, decode_s=decode,
                       postprocess_s=postprocess)  # fmt: skip


def _hand_built_run() -> BenchRun:
    recipe_names = ["sdpa", "diffusers-compile", "diffopt", "broken"]
    settings = BenchSettings(pipelines=["sd-txt2img", "if"], batch_sizes=[2], recipes=recipe_names, device="cpu")
    cells = [
        CellResult("sd-txt2img", 2, "sdpa", stages=[_stage("", 2.0, 2, 1.5, 0.4, 0.1)]),
        CellResult("sd-txt2img", 2, "diffusers-compile", stages=[_stage("", 1.0, 2, 0.6, 0.3, 0.1)]),
        CellResult("sd-txt2img", 2, "diffopt", stages=[_stage("", 0.8, 2, 0.45, 0.25, 0.1)]),
        CellResult("sd-txt2img", 2, "broken", status="error", error="RuntimeError in recipe: no"),
        # IF without sdpa: its speed-ups are over the compile recipe only, summed over the stages.
        CellResult("if", 2, "diffusers-compile", stages=[_stage("I", 1.0, 2), _stage("II", 3.0)]),
        CellResult("if", 2, "diffopt", stages=[_stage("I", 0.5, 2), _stage("II", 1.5)]),
    ]
    return BenchRun(settings, {"device": "cpu"}, None, [], cells)


def test_end_to_end_table_has_the_split_and_speed_ups_from_the_numbers():
    run = _hand_built_run()
    assert output.end_to_end_header(run)[-2:] == ["speed-up vs sdpa", "speed-up vs diffusers-compile"]
    rows = {(row[0], row[1]): row for row in output.end_to_end_rows(run, 2)}
    # 2 images in 0.8 s; sdpa's 2.0 s / 0.8 s and diffusers-compile's 1.0 s / 0.8 s.
    assert rows[("SD - txt2img", "diffopt")][2:] == ["0.800", "2.50", "0.450", "0.250", "0.100", "2.50x", "1.25x"]
    assert rows[("SD - txt2img", "sdpa")][-2:] == ["1.00x", "0.50x"]  # slower than the compile recipe
    assert rows[("SD - txt2img", "broken")][-1] == "RuntimeError in recipe: no"
    # IF: per stage, and (1.0 + 3.0) / (0.5 + 1.5) = 2.00x over the compile recipe; no sdpa cell, no speed-up.
    assert rows[("IF (stages I / II / III)", "diffopt")][2:4] == ["0.500 / 1.500", "4.00 / 0.67"]
    assert rows[("IF (stages I / II / III)", "diffopt")][-2:] == ["-", "2.00x"]
    markdown = output.to_markdown(run)
    assert "## End to end (batch size: 2), seconds per call to PIL images" in markdown
    assert "| SD - txt2img | diffopt | 0.800 | 2.50 | 0.450 | 0.250 | 0.100 | 2.50x | 1.25x |" in markdown
    assert "the first to decode" not in markdown  # every stage has its repeated calls


def test_results_without_the_end_to_end_fields_still_load_and_say_so(tmp_path):
    run = _hand_built_run()
    data = json.loads(json.dumps(run.to_json(), default=str))
    for cell in data["cells"]:
        for stage in cell["stages"]:
            for name in ("end_to_end_times_s", "first_decode_call_s", "loop_s", "decode_s", "postprocess_s"):
                stage.pop(name)
    (tmp_path / "results.json").write_text(json.dumps(data))
    loaded = load_run(str(tmp_path))
    stage = loaded.cells[2].stages[0]
    assert stage.end_to_end_s == 0.8 and stage.loop_s is None and stage.end_to_end_times_s is None
    rows = {(row[0], row[1]): row for row in output.end_to_end_rows(loaded, 2)}
    assert rows[("SD - txt2img", "diffopt")][2:] == ["0.800", "2.50", "-", "-", "-", "2.50x", "1.25x"]
    assert "end-to-end s is a single call, the first to decode" in output.to_markdown(loaded)

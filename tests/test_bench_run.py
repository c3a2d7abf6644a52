"""A whole (tiny, CPU) benchmark run: every cell measured or its failure recorded, and every output written."""
import importlib.util
import json

import pytest
import torch

from diffopt.bench import measure, output, recipes
from diffopt.bench.env import OutOfMemoryError
from diffopt.bench.runner import BenchSettings, run_benchmark

QUICK = dict(device="cpu", size="tiny", steps=1, warmup=1, repeats=2)


@pytest.fixture(autouse=True, scope="module")
def _no_onednn():
    # oneDNN compiles a kernel per new convolution shape: seconds on a small CPU, milliseconds without it.
    with torch.backends.mkldnn.flags(enabled=False):
        yield


def _failing_recipes(monkeypatch):
    """Register a recipe that raises, and one whose pipeline runs out of memory in the timed calls."""

    def broken(pipe):
        raise RuntimeError("recipe exploded")

    def oom_after_warmup(pipe):
        real_call = type(pipe).__call__
        calls = []

        def call(self, *args, **kwargs):
            calls.append(1)
            if len(calls) > 1:  # the first (warm) call passes, the timed ones fail
                raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return real_call(self, *args, **kwargs)

        # A subclass per pipeline instance: the class of every other pipeline stays untouched.
        pipe.__class__ = type(type(pipe).__name__, (type(pipe),), {"__call__": call})

    monkeypatch.setitem(recipes.RECIPES, "broken", broken)
    monkeypatch.setitem(recipes.RECIPES, "oom", oom_after_warmup)


@pytest.fixture(scope="module")
def run():
    # One run shared by the tests that read it: building and timing 16 cells is the slow part.
    settings = BenchSettings(
        pipelines=["sd-txt2img", "if"], batch_sizes=[1, 2], recipes=["classic", "sdpa", "broken", "oom"], **QUICK
    )
    with pytest.MonkeyPatch.context() as monkeypatch:
        _failing_recipes(monkeypatch)
        return run_benchmark(settings, argv=["diffopt", "bench", "--test"])


def _cell(run, pipeline, batch_size, recipe):
    (cell,) = [c for c in run.cells if (c.pipeline, c.batch_size, c.recipe) == (pipeline, batch_size, recipe)]
    return cell


def test_every_cell_is_measured_or_records_its_failure(run):
    assert len(run.cells) == 2 * 2 * 4
    for pipeline in ("sd-txt2img", "if"):
        for batch_size in (1, 2):
            sdpa = _cell(run, pipeline, batch_size, "sdpa")
            classic = _cell(run, pipeline, batch_size, "classic")
            assert sdpa.ok and classic.ok
            for stage in sdpa.stages:
                assert stage.steps == 1 and stage.steps_per_s == pytest.approx(1 / stage.median_s)
                assert len(stage.times_s) == 2 and stage.flops_per_step > 0
                assert stage.relative_l2 == pytest.approx(0.0, abs=1e-6)  # same build, same seed as the reference
                assert stage.psnr_db > 60  # decoded images: the same pixels, or within a rounding of them
                _assert_end_to_end_measured(stage)
            # Classic attention computes the same function: small but nonzero difference.
            assert all(0 < stage.relative_l2 < 1e-3 for stage in classic.stages)
            broken = _cell(run, pipeline, batch_size, "broken")
            assert broken.status == "error" and "recipe exploded" in broken.error and "recipe" in broken.error
            assert broken.stages == [] and "RuntimeError" in broken.traceback
            oom = _cell(run, pipeline, batch_size, "oom")
            assert oom.status == "oom" and oom.error.startswith("OOM after warmup")
    assert _cell(run, "if", 2, "oom").error == "OOM after warmup (stage I)"
    # IF runs its upscalers at batch 1 whatever the batch size, like the docs page.
    assert [s.batch_size for s in _cell(run, "if", 2, "sdpa").stages] == [2, 1, 1]


def _assert_end_to_end_measured(stage):
    """Two timed calls to PIL images and their median; the split of two more, with a decode wherever the
    stage's pipeline has a VAE (not IF's stages I and II) and a post-processing step in every pipeline."""
    assert len(stage.end_to_end_times_s) == 2
    assert stage.end_to_end_s == pytest.approx(sum(stage.end_to_end_times_s) / 2)
    assert stage.first_decode_call_s > 0 and stage.loop_s > 0 and stage.postprocess_s > 0
    assert (stage.decode_s is None) == (stage.label in ("I", "II")), stage.label
    assert stage.decode_s is None or stage.decode_s > 0


def test_tables_have_a_cell_per_pipeline_and_recipe(run, capsys):
    rows = output.table_rows(run, 2)
    assert [row[0] for row in rows] == ["SD - txt2img", "IF (stages I / II / III)"]  # the cells' order
    sd_row, if_row = rows
    assert sd_row[3] == "recipe exploded" or "RuntimeError" in sd_row[3]
    assert sd_row[4].startswith("OOM after warmup")
    assert len(if_row[2].split(" / ")) == 3
    assert float(sd_row[2]) == pytest.approx(_cell(run, "sd-txt2img", 2, "sdpa").stages[0].steps_per_s, rel=0.01)
    output.print_tables(run)
    printed = capsys.readouterr().out
    assert "batch size: 1" in printed and "batch size: 2" in printed and "OOM after warmup" in printed
    assert "End to end (batch size: 2)" in printed and "speed-up vs sdpa" in printed


def test_outputs_are_written_with_every_raw_number(run, tmp_path):
    paths = output.write_outputs(run, str(tmp_path / "out"))
    data = json.loads(open(paths["json"]).read())
    assert len(data["cells"]) == len(run.cells)
    assert {"torch", "diffusers", "python", "date", "argv", "gpu", "driver"} <= set(data["environment"])
    assert data["environment"]["argv"] == ["diffopt", "bench", "--test"]
    assert data["settings"]["recipes"] == ["classic", "sdpa", "broken", "oom"]
    first = data["cells"][0]["stages"][0]
    assert {"times_s", "median_s", "first_call_s", "end_to_end_s", "flops_per_step", "relative_l2"} <= set(first)
    assert {"end_to_end_times_s", "first_decode_call_s", "loop_s", "decode_s", "postprocess_s"} <= set(first)
    assert all("output" not in stage for ref in data["references"] for stage in ref["stages"])
    markdown = open(paths["markdown"]).read()
    assert "| SD - txt2img |" in markdown and "## Details" in markdown and "OOM after warmup" in markdown
    assert markdown.index("## End to end (batch size: 1)") < markdown.index("## Details")
    pytest.importorskip("matplotlib")
    assert open(paths["chart"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_speedups_are_relative_to_sdpa(run):
    speedups = output.speedups(run)
    for key, values in speedups.items():
        assert values["sdpa"] == pytest.approx(1.0)
        assert "broken" not in values and "oom" not in values
    sd = speedups[("sd-txt2img", 1)]
    classic, sdpa = _cell(run, "sd-txt2img", 1, "classic"), _cell(run, "sd-txt2img", 1, "sdpa")
    assert sd["classic"] == pytest.approx(sdpa.stages[0].median_s / classic.stages[0].median_s)


def test_chart_falls_back_to_the_docs_recipe_and_is_skipped_without_any_baseline(run, tmp_path, capsys):
    import dataclasses

    # A run that timed only compiled recipes: the sdpa cells renamed stand for it.
    compiled = dataclasses.replace(run, cells=[
        dataclasses.replace(c, recipe="diffusers-compile") if c.recipe == "sdpa" else c for c in run.cells])  # fmt: skip
    ups = output.speedups(compiled, "diffusers-compile")[("sd-txt2img", 1)]
    assert ups["diffusers-compile"] == pytest.approx(1.0) and ups["classic"] == pytest.approx(output.speedups(run)[("sd-txt2img", 1)]["classic"])
    if importlib.util.find_spec("matplotlib"):
        assert output.plot_speedups(compiled, str(tmp_path / "chart.png")) is not None
    lone = run_benchmark(BenchSettings(pipelines=["sdxl"], recipes=["classic"], **QUICK))
    assert output.plot_speedups(lone, str(tmp_path / "speedup.png")) is None
    assert "'sdpa', 'diffusers-compile', 'compile'" in capsys.readouterr().err


def test_diffopt_recipe_calls_optimize_and_keeps_its_report():
    run = run_benchmark(BenchSettings(pipelines=["sd-txt2img"], recipes=["sdpa", "diffopt-nocompile"], **QUICK))
    cell = _cell(run, "sd-txt2img", 1, "diffopt-nocompile")
    assert cell.ok, cell.error
    assert cell.notes and cell.stages[0].relative_l2 < 1e-3


def test_bad_recipe_fails_before_anything_is_built():
    with pytest.raises(ValueError, match="unknown recipe 'turbo'.*classic"):
        run_benchmark(BenchSettings(pipelines=["sd-txt2img"], recipes=["sdpa", "turbo"], **QUICK))


def test_defaults_compare_eager_the_docs_recipe_and_diffopt_on_every_device():
    for device in ("cpu", "cuda"):
        settings = BenchSettings(device=device).resolved()
        assert settings.recipes == ["sdpa", "diffusers-compile", "diffopt"]
        assert [recipes.resolve(spec).compiles for spec in settings.recipes] == [False, True, True]
    cpu = BenchSettings(device="cpu").resolved()
    # Quick on a CPU: one tiny pipeline, so inductor compiles two UNets, not twelve pipelines' worth.
    assert (cpu.pipelines, cpu.size, cpu.dtype, cpu.batch_sizes) == (["sd-txt2img"], "tiny", "fp32", [1])
    cuda = BenchSettings(device="cuda").resolved()
    assert (cuda.size, cuda.dtype, cuda.batch_sizes, cuda.warmup, cuda.repeats) == ("full", "fp16", [1, 4], 3, 7)
    assert len(cuda.pipelines) == 6
    cuda.batch_sizes.append(16)  # a copy: the defaults stay as they are
    assert BenchSettings(device="cuda").resolved().batch_sizes == [1, 4]


def _stop_in_second_stage(stop):
    """A recipe that lets IF's stage I run and calls ``stop()`` at the first call of stage II's pipeline."""

    def recipe(pipe):
        if type(pipe).__name__ != "IFSuperResolutionPipeline":
            return
        pipe.__class__ = type(type(pipe).__name__, (type(pipe),), {"__call__": lambda self, *a, **k: stop()})

    return recipe


def test_an_interrupted_cell_keeps_its_finished_stages_and_ends_the_run(monkeypatch):
    def stop():
        raise KeyboardInterrupt

    monkeypatch.setitem(recipes.RECIPES, "stops", _stop_in_second_stage(stop))
    settings = BenchSettings(pipelines=["if", "sd-txt2img"], batch_sizes=[1], recipes=["stops", "sdpa"], **QUICK)
    run = run_benchmark(settings)
    (cell,) = run.cells  # nothing after the interrupted cell: not sdpa, not the SD pipeline
    assert cell.status == "interrupted" and cell.error == "interrupted in first call (stage II)"
    assert [stage.label for stage in cell.stages] == ["I"] and cell.stages[0].steps_per_s > 0
    assert run.interrupted.startswith("interrupted in first call (stage II), batch 1 of if")
    assert "I" in output.format_cell(cell) and "interrupted" in output.format_cell(cell)


def test_a_cell_stopped_in_its_calls_to_pil_images_keeps_its_loop_speed(monkeypatch):
    """Ctrl-C during the end-to-end calls, after the denoising loop was timed: steps/s and fidelity stay."""
    real_timed = measure._timed
    output_types = []

    def timed(stage, batch_size, output_type, device):
        # The first call to PIL images right after another one: the first end-to-end call, after the first decode.
        if output_type == "pil" and output_types[-1:] == ["pil"]:
            raise KeyboardInterrupt
        output_types.append(output_type)
        return real_timed(stage, batch_size, output_type, device)

    monkeypatch.setattr(measure, "_timed", timed)
    settings = BenchSettings(pipelines=["sd-txt2img"], batch_sizes=[1], recipes=["sdpa"], **QUICK)
    run = run_benchmark(settings)
    (cell,) = run.cells
    assert cell.status == "interrupted" and cell.error == "interrupted in end-to-end calls"
    (stage,) = cell.stages
    assert stage.steps_per_s > 0 and len(stage.times_s) == QUICK["repeats"]
    assert stage.first_decode_call_s > 0 and stage.end_to_end_s is None and stage.loop_s is None
    assert output.format_cell(cell).startswith(f"{stage.steps_per_s:.2f} / interrupted")


def test_an_interruption_in_the_eager_reference_ends_the_run_before_any_cell(monkeypatch):
    from diffopt.bench import measure

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(measure, "_probe_stage", interrupted)
    settings = BenchSettings(pipelines=["sd-txt2img", "if"], batch_sizes=[1], recipes=["sdpa"], **QUICK)
    run = run_benchmark(settings)
    assert run.cells == [] and run.interrupted == "interrupted in the eager reference of sd-txt2img"


def _stage(label, seconds):
    from diffopt.bench.measure import StageResult

    return StageResult(label, 1, 10, 1.0, [seconds], seconds, 10 / seconds)


def test_speedups_compare_only_cells_of_the_same_stages():
    from diffopt.bench.measure import CellResult
    from diffopt.bench.runner import BenchRun

    settings = BenchSettings(pipelines=["if"], batch_sizes=[1], recipes=["diffusers-compile", "diffopt", "diffopt-fp8"], **QUICK)
    compiled = CellResult("if", 1, "diffusers-compile", stages=[_stage("I", 1.0), _stage("II", 2.0)])
    diffopt = CellResult("if", 1, "diffopt", stages=[_stage("I", 0.5), _stage("II", 1.5)])
    partial = CellResult("if", 1, "diffopt-fp8", stages=[_stage("II", 1.0)])
    speedups = output.speedups(BenchRun(settings, {}, None, [], [compiled, diffopt, partial]), baseline="diffusers-compile")
    assert speedups[("if", 1)] == {"diffusers-compile": 1.0, "diffopt": 1.5}  # stage II alone is no speed-up over I + II




def test_chart_legend_sits_below_the_bars(run):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = output.speedup_figure(run, "sdpa", output.speedups(run), plt)
    try:
        renderer = figure.canvas.get_renderer()
        (legend,) = figure.legends
        assert not any(axis.get_legend() for axis in figure.axes)  # no legend inside a panel
        top = legend.get_window_extent(renderer).y1
        assert all(top <= axis.get_tightbbox(renderer).y0 + 1 for axis in figure.axes)  # below tick labels too
        assert [text.get_text() for text in legend.get_texts()] == ["classic", "sdpa", "broken", "oom"]
    finally:
        plt.close(figure)

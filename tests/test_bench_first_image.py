"""Time to first image in the bench: optimize time, cold and new-shape first calls, break-even, --warm-start."""
import json
import os

import pytest
import torch

from diffopt.bench import output
from diffopt.bench.first_image import add_break_even, break_even_images, isolated_caches, warm_first_call
from diffopt.bench.measure import CellResult, CellSettings, StageResult
from diffopt.bench.runner import BenchRun, BenchSettings, load_run, run_benchmark

QUICK = dict(device="cpu", size="tiny", steps=1, warmup=1, repeats=1)


@pytest.fixture(autouse=True, scope="module")
def _no_onednn():
    # oneDNN compiles a kernel per new convolution shape: seconds on a small CPU, milliseconds without it.
    with torch.backends.mkldnn.flags(enabled=False):
        yield


# --- break-even on hand-made numbers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "numbers, expected",
    [
        # 60 s compile + first call against a 5 s eager first call, 1 s/image gained: 55 s to win back, the 57th.
        ((0.0, 60.0, 1.0, 5.0, 2.0, 1), 57),
        ((5.0, 55.0, 1.0, 5.0, 2.0, 1), 57),  # optimize time counts like first-call time
        ((0.0, 3.0, 1.0, 5.0, 2.0, 1), 1),  # ahead from the first image
        ((0.0, 60.0, 2.0, 5.0, 2.0, 1), None),  # no faster per call: never
        ((0.0, 60.0, 3.0, 5.0, 2.0, 1), None),  # slower: never
        ((0.0, 60.0, 1.0, 5.0, 2.0, 4), 228),  # batch 4: 57 calls of 4 images
        ((0.0, 7.0, 1.0, 5.0, 2.0, 1), 4),  # D = 2 s exactly: equal after 3 images, below after 4
    ],
)
def test_break_even_formula(numbers, expected):
    assert break_even_images(*numbers) == expected


def _cell(recipe, first, median, optimize=0.0, batch=1, warm_first=None, warm_optimize=None, status="ok"):
    stage = StageResult("", batch, 10, first, [median], median, 10 / median, warm_first_call_s=warm_first)
    return CellResult("sd-txt2img", batch, recipe, status=status, optimize_s=optimize, stages=[stage],
                      warm_optimize_s=warm_optimize)  # fmt: skip


def test_time_to_first_image_counts_the_decoders_first_call():
    # The first calls return latents; a recipe that compiles the VAE decoder pays for it in its first call to PIL
    # images. What that call took beyond a steady one counts in the cold time to the first image, not the warm one.
    plain, decoded = _cell("diffopt", 40.0, 0.3, optimize=1.0), _cell("diffopt:compile_vae=True", 38.0, 0.3, optimize=1.0)
    for cell, first_decode in ((plain, 0.4), (decoded, 18.4)):
        cell.stages[0].first_decode_call_s, cell.stages[0].end_to_end_s = first_decode, 0.35
        cell.warm_optimize_s, cell.stages[0].warm_first_call_s = 1.0, 5.0
    assert output.time_to_first_image(plain) == pytest.approx(41.05)
    assert output.time_to_first_image(decoded) == pytest.approx(57.05)
    assert output.time_to_first_image(decoded, warm=True) == pytest.approx(6.0)
    settings = BenchSettings(pipelines=["sd-txt2img"], batch_sizes=[1], recipes=["diffopt", "diffopt:compile_vae=True"])
    run = BenchRun(settings, environment={}, matmul_peak_flops=None, references=[], cells=[plain, decoded])
    rows = {row[1]: row for row in output.first_image_rows(run, 1)}
    assert rows["diffopt:compile_vae=True"][3:5] == ["38.00", "57.05"]


def test_break_even_of_cells_is_against_the_sdpa_cell_of_the_same_row():
    cells = [
        _cell("sdpa", 5.0, 2.0),
        _cell("diffopt", 60.0, 1.0, optimize=0.5, warm_first=10.0, warm_optimize=0.5),
        _cell("classic", 5.0, 3.0),
        _cell("compile", 60.0, 1.0, status="error"),
        _cell("diffopt", 60.0, 1.0, batch=2),  # no sdpa cell at batch 2
    ]
    add_break_even(cells)
    reference, compiled, classic, failed, alone = cells
    assert reference.break_even_images is None  # against itself: "-"
    assert compiled.break_even_images == break_even_images(0.5, 60.0, 1.0, 5.0, 2.0) == 57
    assert compiled.warm_break_even_images == break_even_images(0.5, 10.0, 1.0, 5.0, 2.0) == 7
    assert classic.break_even_images is None and classic.warm_break_even_images is None
    assert failed.break_even_images is None and alone.break_even_images is None


# --- a run with two batch sizes ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run():
    settings = BenchSettings(pipelines=["sd-txt2img"], batch_sizes=[1, 2], recipes=["classic", "sdpa"], **QUICK)
    return run_benchmark(settings)


def test_new_shape_first_call_is_the_next_batch_size_on_the_same_pipeline(run):
    by_batch = {}
    for cell in run.cells:
        assert cell.ok, cell.error
        assert cell.optimize_s is not None and cell.optimize_s >= 0
        by_batch.setdefault(cell.batch_size, []).append(cell)
    for cell in by_batch[1]:
        (stage,) = cell.stages
        assert stage.new_shape_batch_size == 2 and stage.new_shape_first_call_s > 0
    for cell in by_batch[2]:  # the last batch size has no next one
        (stage,) = cell.stages
        assert stage.new_shape_batch_size is None and stage.new_shape_first_call_s is None


def test_break_even_is_an_int_or_none_and_sdpa_is_never_against_itself(run):
    for cell in run.cells:
        assert cell.break_even_images is None or isinstance(cell.break_even_images, int)
        if cell.recipe == "sdpa":
            assert cell.break_even_images is None


def test_time_to_first_image_table_and_json_round_trip(run, tmp_path, capsys):
    paths = output.write_outputs(run, str(tmp_path))
    markdown = open(paths["markdown"]).read()
    assert "## Time to first image (batch size: 1), seconds" in markdown
    assert "(batch 2)" in markdown and "break-even images vs sdpa" in markdown
    assert "warm first call s" not in output.first_image_header(run)  # no --warm-start: no warm columns
    if paths["first image chart"]:  # None without matplotlib
        assert os.path.getsize(paths["first image chart"]) > 0
    data = json.load(open(paths["json"]))
    assert data["settings"]["warm_start"] is False
    cell = data["cells"][0]
    for name in ("optimize_s", "break_even_images", "warm_optimize_s", "warm_error", "warm_break_even_images"):
        assert name in cell
    for name in ("new_shape_batch_size", "new_shape_first_call_s", "warm_first_call_s"):
        assert name in cell["stages"][0]

    loaded = load_run(str(tmp_path))
    for before, after in zip(run.cells, loaded.cells):
        assert after.optimize_s == before.optimize_s
        assert after.break_even_images == before.break_even_images
        assert after.stages[0].new_shape_first_call_s == before.stages[0].new_shape_first_call_s
        assert after.stages[0].new_shape_batch_size == before.stages[0].new_shape_batch_size
    output.print_tables(loaded)
    assert "Time to first image (batch size: 2)" in capsys.readouterr().out


def test_results_without_the_new_fields_still_load(run, tmp_path):
    data = json.loads(json.dumps(run.to_json(), default=str))
    data["settings"].pop("warm_start")
    for cell in data["cells"]:
        for name in ("optimize_s", "break_even_images", "warm_optimize_s", "warm_error", "warm_break_even_images"):
            cell.pop(name)
        for stage in cell["stages"]:
            for name in ("new_shape_batch_size", "new_shape_first_call_s", "warm_first_call_s"):
                stage.pop(name)
    (tmp_path / "results.json").write_text(json.dumps(data))
    loaded = load_run(str(tmp_path))
    assert loaded.settings.warm_start is False and loaded.cells[0].break_even_images is None
    assert "Time to first image" in output.to_markdown(loaded)


# --- the caches a compiling cell runs with, and the warm start --------------------------------------------------


def test_isolated_caches_point_at_the_cell_directory_and_put_back_what_was_there(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFOPT_CACHE_DIR", "off")
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    with isolated_caches(str(tmp_path)) as variables:
        assert os.environ["DIFFOPT_CACHE_DIR"] == str(tmp_path / "diffopt") == variables["DIFFOPT_CACHE_DIR"]
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"].startswith(str(tmp_path))
    assert os.environ["DIFFOPT_CACHE_DIR"] == "off" and "TRITON_CACHE_DIR" not in os.environ


def test_warm_first_call_subprocess_prints_one_json_line(tmp_path):
    # The protocol alone, on an eager recipe: no compile, so it takes seconds.
    settings = CellSettings(size="tiny", device=torch.device("cpu"), dtype=torch.float32, steps=1)
    result = warm_first_call("sd-txt2img", 1, "sdpa", settings, str(tmp_path))
    assert "error" not in result, result
    assert result["optimize_s"] >= 0 and len(result["first_call_s"]) == 1 and result["first_call_s"][0] > 0
    assert result["labels"] == [""]


def test_warm_first_call_reports_a_failing_child():
    settings = CellSettings(size="tiny", device=torch.device("cpu"), dtype=torch.float32, steps=1)
    result = warm_first_call("sd-txt2img", 1, "no-such-recipe", settings, "/nonexistent")
    assert result["error"].startswith("warm start exited with status 1") and "no-such-recipe" in result["error"]


@pytest.mark.compile
def test_warm_start_records_the_warm_first_call_of_a_compiled_recipe(tmp_path):
    # One compiling recipe, one batch size, one step: the cold cell compiles and saves, the new process loads.
    settings = BenchSettings(pipelines=["sd-txt2img"], recipes=["sdpa", "diffopt"], warm_start=True, **QUICK)
    run = run_benchmark(settings)
    reference, cell = run.cells
    assert cell.ok, cell.error
    assert cell.warm_error is None, cell.warm_error
    assert cell.warm_optimize_s is not None and cell.warm_optimize_s >= 0
    assert cell.stages[0].warm_first_call_s > 0
    assert cell.warm_break_even_images is None or isinstance(cell.warm_break_even_images, int)
    assert reference.warm_optimize_s is None and reference.stages[0].warm_first_call_s is None  # eager: no warm start
    assert "warm to first image s" in output.first_image_header(run)
    paths = output.write_outputs(run, str(tmp_path))
    loaded = load_run(paths["json"])
    assert loaded.settings.warm_start is True
    assert loaded.cells[1].stages[0].warm_first_call_s == cell.stages[0].warm_first_call_s
    assert loaded.cells[1].warm_optimize_s == cell.warm_optimize_s


# --- the command line ---------------------------------------------------------------------------------------------


def test_help_lists_warm_start_with_its_default_and_the_flag_reaches_the_settings():
    import argparse
    import re

    from diffopt.bench.command import add_arguments, settings_from

    parser = argparse.ArgumentParser(prog="diffopt bench")
    add_arguments(parser)
    blocks = re.split(r"\n  (?=--)", parser.format_help())
    (block,) = [" ".join(block.split()) for block in blocks if block.startswith("--warm-start ")]
    assert "(default: off)" in block and "DIFFOPT_CACHE_DIR" in block
    assert settings_from(parser.parse_args([])).warm_start is False
    assert settings_from(parser.parse_args(["--warm-start"])).warm_start is True

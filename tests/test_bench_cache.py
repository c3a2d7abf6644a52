"""``diffopt bench`` and step caching: cache recipes, PSNR/SSIM against the reference image, the quality tables."""
import json
import math

import pytest
import torch

from diffopt.bench import image_quality, output, recipes
from diffopt.bench.runner import BenchSettings, load_run, run_benchmark
from diffopt.cli import build_parser

CACHED = "diffopt:compile=False,cache=deepcache,cache_interval=2"


@pytest.fixture(autouse=True, scope="module")
def _no_onednn():
    # oneDNN compiles a kernel per new convolution shape: seconds on a small CPU, milliseconds without it.
    with torch.backends.mkldnn.flags(enabled=False):
        yield


# --- SSIM (PSNR is main's, tested with it) -------------------------------------------------------------------


def pixels(values):
    """(N, H, W, C) uint8 pixels, as image_quality.pixels makes them from PIL images."""
    return torch.as_tensor(values).round().clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("a, b", [(50, 150), (128, 128), (0, 255)])
def test_ssim_of_flat_images_is_the_luminance_term(a, b):
    # No variance, no covariance: SSIM reduces to (2ab + c1) / (a^2 + b^2 + c1), on [0, 1] values.
    c1 = image_quality.SSIM_K1**2
    x, y = pixels(torch.full((2, 20, 20, 3), a)), pixels(torch.full((2, 20, 20, 3), b))
    a, b = a / 255, b / 255
    assert image_quality.ssim(x, y) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-5)


def test_ssim_is_symmetric_falls_with_noise_and_handles_images_smaller_than_its_window():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 32, 32, 3, generator=g) * 255
    noisy = [pixels(image + s * torch.randn(image.shape, generator=g)) for s in (5, 25, 75)]
    image = pixels(image)
    scores = [image_quality.ssim(n, image) for n in noisy]
    assert scores == sorted(scores, reverse=True) and 0 < scores[-1] < scores[0] < 1
    assert image_quality.ssim(noisy[1], image) == pytest.approx(image_quality.ssim(image, noisy[1]))
    assert image_quality.ssim(image, image) == 1.0
    assert 0 < image_quality.ssim(noisy[0][:, :8, :8], image[:, :8, :8]) < 1  # IF stage I is 8 px when tiny
    assert image_quality.ssim(image, image[:, :16]) is None and image_quality.ssim(None, image) is None


# --- recipes ---------------------------------------------------------------------------------------------------


def test_cache_presets_and_settings_build_the_cache_objects():
    import diffopt

    assert recipes.resolve("diffopt-deepcache3").options == {"cache": diffopt.DeepCache(interval=3)}
    assert recipes.resolve("diffopt-deepcache5").options == {"cache": diffopt.DeepCache(interval=5)}
    assert recipes.resolve("diffopt-cache").options == {"cache": "auto"}
    spec = recipes.resolve("diffopt:compile=False,cache=first_block,cache_threshold=0.1")
    assert spec.options == {"compile": False, "cache": diffopt.FirstBlockCache(threshold=0.1)}
    assert spec.caches and spec.changes_output and spec.compiles is False
    assert recipes.resolve("diffopt:cache_depth=2").options == {"cache": diffopt.DeepCache(depth=2)}
    assert not recipes.resolve("diffopt").caches and not recipes.resolve("sdpa").caches
    assert recipes.resolve("diffopt-int8").changes_output and not recipes.resolve("diffopt-int8").caches
    assert not recipes.resolve("diffopt").changes_output


@pytest.mark.parametrize(
    "spec, words",
    [
        ("diffopt:cache=deep", ["'deep'", "'deepcache'", "'first_block'"]),
        ("diffopt:cache_interval=0", ["interval", "0"]),
        ("diffopt:cache_interval='x'", ["interval", "'x'"]),
        ("diffopt:cache=auto,cache_interval=2", ["cache_interval", "'auto'"]),
        ("diffopt:cache=first_block,cache_depth=2", ["cache_depth", "'first_block'"]),
        ("diffopt:cache_interval=2,cache_threshold=0.1", ["cache_interval", "cache_threshold"]),
    ],
)
def test_bad_cache_recipes_fail_on_the_command_line(capsys, spec, words):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "--recipes", f"sdpa,{spec}"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "--recipes" in message
    for word in words:
        assert word in message, (word, message)


# --- a run -------------------------------------------------------------------------------------------------------

QUICK = dict(device="cpu", size="tiny", steps=2, warmup=1, repeats=1)  # step 0 full, step 1 cached


@pytest.fixture(scope="module")
def run():
    settings = BenchSettings(pipelines=["sd-txt2img"], recipes=["sdpa", CACHED], **QUICK)
    return run_benchmark(settings)


def _cell(run, recipe):
    (cell,) = [c for c in run.cells if c.recipe == recipe]
    assert cell.ok, cell.error
    return cell.stages[0]


def test_cells_report_the_quality_cost_against_the_reference(run):
    reference, cached = _cell(run, "sdpa"), _cell(run, CACHED)
    # The same build and seed as the reference: identical. Caching changes the image: finite PSNR, SSIM below 1.
    assert reference.psnr_db == math.inf and reference.ssim == 1.0 and reference.relative_l2 == 0
    assert math.isfinite(cached.psnr_db) and 0 < cached.ssim < 1 and cached.relative_l2 > 0
    assert cached.mfu is None  # a cached step does a fraction of the FLOPs counted for a full one


def test_quality_tables_pair_speed_up_and_quality_and_say_random_weights_are_indicative(run, tmp_path):
    recipe_names = output._recipes(run)
    (row,) = output.quality_rows(run, 1)
    cached = row[1 + recipe_names.index(CACHED)]
    speedup = output.speedups(run)[("sd-txt2img", 1)][CACHED]
    assert cached.startswith(f"{speedup:.2f}x, ") and " dB, " in cached
    paths = output.write_outputs(run, str(tmp_path))
    markdown = open(paths["markdown"]).read()
    assert "## Quality (batch size: 1)" in markdown and "only indicative" in markdown
    assert markdown.index("## Quality") < markdown.index("## Details") and "SSIM vs sdpa" in markdown
    data = json.loads(open(paths["json"]).read())
    assert all("image" not in stage for ref in data["references"] for stage in ref["stages"])
    loaded = load_run(paths["json"])
    assert [s.ssim for c in loaded.cells for s in c.stages] == [s.ssim for c in run.cells for s in c.stages]


def test_runs_without_an_output_changing_recipe_have_no_quality_tables():
    run = run_benchmark(BenchSettings(pipelines=["sd-txt2img"], recipes=["sdpa"], **{**QUICK, "steps": 1}))
    assert run.cells[0].stages[0].ssim == 1.0  # measured all the same, in the details
    assert not output.has_quality(run) and "## Quality" not in output.to_markdown(run)

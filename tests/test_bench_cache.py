"""``diffopt bench`` and step caching: cache recipes, PSNR/SSIM against the reference image, the quality tables."""
import json
import math

import numpy as np
import pytest
import torch

from diffopt.bench import output, quality, recipes
from diffopt.bench.runner import BenchSettings, load_run, run_benchmark
from diffopt.cli import build_parser

CACHED = "diffopt:compile=False,cache=deepcache,cache_interval=2"


@pytest.fixture(autouse=True, scope="module")
def _no_onednn():
    # oneDNN compiles a kernel per new convolution shape: seconds on a small CPU, milliseconds without it.
    with torch.backends.mkldnn.flags(enabled=False):
        yield


# --- PSNR and SSIM --------------------------------------------------------------------------------------------


def test_psnr_of_a_known_error():
    image = torch.full((1, 3, 16, 16), 0.5)
    assert quality.psnr(image + 0.1, image) == pytest.approx(20.0)  # mse 0.01 -> 10 log10(1 / 0.01)
    assert quality.psnr(image, image) == math.inf


@pytest.mark.parametrize("a, b", [(0.2, 0.6), (0.5, 0.5), (0.0, 1.0)])
def test_ssim_of_flat_images_is_the_luminance_term(a, b):
    # No variance, no covariance: SSIM reduces to (2ab + c1) / (a^2 + b^2 + c1).
    c1 = (quality.K1 * 1.0) ** 2
    x, y = torch.full((2, 3, 20, 20), a), torch.full((2, 3, 20, 20), b)
    assert quality.ssim(x, y) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))


def test_ssim_is_symmetric_falls_with_noise_and_handles_images_smaller_than_its_window():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 32, 32, generator=g)
    noisy = [(image + s * torch.randn(image.shape, generator=g)).clamp(0, 1) for s in (0.02, 0.1, 0.3)]
    scores = [quality.ssim(n, image) for n in noisy]
    assert scores == sorted(scores, reverse=True) and 0 < scores[-1] < scores[0] < 1
    assert quality.ssim(noisy[1], image) == pytest.approx(quality.ssim(image, noisy[1]))
    assert quality.ssim(image, image) == pytest.approx(1.0)
    assert 0 < quality.ssim(noisy[0][..., :8, :8], image[..., :8, :8]) < 1  # IF stage I is 8 px when tiny


def test_pil_images_become_unit_range_tensors_and_mismatches_compare_to_nothing():
    from PIL import Image

    pixels = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    tensor = quality.to_tensor([Image.fromarray(pixels)] * 2)
    assert tensor.shape == (2, 3, 4, 6) and tensor.dtype == torch.float32
    assert torch.equal(tensor[0, :, 1, 2], torch.from_numpy(pixels[1, 2]).float() / 255)
    assert quality.compare(tensor, tensor[:, :, :2]) == (None, None)
    assert quality.compare(tensor, None) == (None, None)


# --- recipes ---------------------------------------------------------------------------------------------------


def test_cache_presets_and_settings_build_the_cache_objects():
    import diffopt

    assert recipes.resolve("diffopt-deepcache3").options == {"cache": diffopt.DeepCache(interval=3)}
    assert recipes.resolve("diffopt-deepcache5").options == {"cache": diffopt.DeepCache(interval=5)}
    assert recipes.resolve("diffopt-cache").options == {"cache": "auto"}
    spec = recipes.resolve("diffopt:compile=False,cache=first_block,cache_threshold=0.1")
    assert spec.options == {"compile": False, "cache": diffopt.FirstBlockCache(threshold=0.1)}
    assert spec.caches and spec.compiles is False
    assert recipes.resolve("diffopt:cache_depth=2").options == {"cache": diffopt.DeepCache(depth=2)}
    assert not recipes.resolve("diffopt").caches and not recipes.resolve("sdpa").caches


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
    assert reference.psnr_db == math.inf and reference.ssim == pytest.approx(1.0) and reference.relative_l2 == 0
    assert math.isfinite(cached.psnr_db) and 0 < cached.ssim < 1 and cached.relative_l2 > 0
    assert run.references[0].stages[0].image.shape[1] == 3  # decoded, because a recipe caches


def test_quality_tables_pair_speed_up_and_quality_and_say_random_weights_are_indicative(run, tmp_path):
    recipe_names = output._recipes(run)
    (row,) = output.quality_rows(run, 1)
    cached = row[1 + recipe_names.index(CACHED)]
    speedup = output.speedups(run)[("sd-txt2img", 1)][CACHED]
    assert cached.startswith(f"{speedup:.2f}x, ") and " dB, " in cached
    paths = output.write_outputs(run, str(tmp_path))
    markdown = open(paths["markdown"]).read()
    assert "## Quality (batch size: 1)" in markdown and "only indicative" in markdown
    assert markdown.index("## Quality") < markdown.index("## Details")
    data = json.loads(open(paths["json"]).read())
    assert all("image" not in stage for ref in data["references"] for stage in ref["stages"])
    loaded = load_run(paths["json"])
    assert [s.psnr_db for c in loaded.cells for s in c.stages] == [s.psnr_db for c in run.cells for s in c.stages]


def test_runs_without_a_cache_recipe_skip_the_reference_decode():
    run = run_benchmark(BenchSettings(pipelines=["sd-txt2img"], recipes=["sdpa"], **{**QUICK, "steps": 1}))
    assert run.references[0].stages[0].image is None
    assert run.cells[0].stages[0].psnr_db is None and not output.has_quality(run)
    assert "## Quality" not in output.to_markdown(run)

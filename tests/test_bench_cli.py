"""``diffopt bench`` on the command line: validation names the bad value and the choices; a run writes files."""
import json
import subprocess
import sys

import pytest
import torch

from diffopt.bench import recipes
from diffopt.cli import build_parser, main


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", *argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--pipelines", "sd-txt2img,sd3"], ["'sd3'", "sd-txt2img", "sdxl", "if"]),
        (["--recipes", "sdpa,turbo"], ["'turbo'", "classic", "seed", "diffopt", "diffopt-nocompile"]),
        (["--recipes", "seed:mode=max"], ["'seed' takes no options"]),
        (["--recipes", "diffopt:compile"], ["key=value", "'compile'"]),
        (["--batch-sizes", "1,0"], ["positive integer", "'0'"]),
        (["--batch-sizes", "1,four"], ["'four'"]),
        (["--dtype", "fp8"], ["'fp8'", "bf16", "fp16", "fp32"]),
        (["--size", "huge"], ["'huge'", "full", "tiny"]),
        (["--device", "tpu"], ["'tpu'", "cuda", "cpu"]),
        (["--weights", "/no/such/dir"], ["/no/such/dir"]),
        (["--steps", "-3"], ["'-3'"]),
    ],
)
def test_bad_values_are_named_with_the_choices(capsys, argv, expected):
    message = _error(capsys, argv)
    assert argv[0] in message
    for text in expected:
        assert text in message


def test_good_values_parse():
    recipe_list = "sdpa,diffopt:compile=False,attention=sdpa"
    argv = ["bench", "--pipelines", "all", "--batch-sizes", "1,4", "--recipes", recipe_list]
    args = build_parser().parse_args(argv)
    assert args.pipelines == ["sd-txt2img", "sd-img2img", "sd-inpaint", "sd-controlnet", "if", "sdxl"] + [
        "sd3-medium", "flux-dev", "flux-schnell"
    ]
    # Without --pipelines: the seed page's six, not the (much larger) transformer pipelines.
    assert build_parser().parse_args(["bench"]).pipelines == args.pipelines[:6]
    assert args.batch_sizes == [1, 4]
    assert args.recipes == ["sdpa", "diffopt:compile=False,attention=sdpa"]
    assert recipes.resolve(args.recipes[1]).options == {"compile": False, "attention": "sdpa"}


def test_recipe_options_are_python_literals_when_they_parse():
    options = recipes.parse_options("compile=False, mode='max-autotune', attention=sdpa, n=3, sizes=(1, 2)")
    assert options == {"compile": False, "mode": "max-autotune", "attention": "sdpa", "n": 3, "sizes": (1, 2)}
    specs = recipes.split_specs("seed,diffopt:a=1,b=(2, 3),c='x,y',diffopt-nocompile")
    assert specs == ["seed", "diffopt:a=1,b=(2, 3),c='x,y'", "diffopt-nocompile"]


def test_presets_resolve_to_their_spec_and_compile_flag():
    recipe = recipes.resolve("diffopt-nocompile")
    assert recipe.name == "diffopt-nocompile" and recipe.options == {"compile": False} and not recipe.compiles
    assert recipes.resolve("seed").compiles and recipes.resolve("diffopt").compiles
    assert recipes.resolve("compile").compiles
    assert not recipes.resolve("sdpa").compiles


@pytest.mark.parametrize("name, denoiser", [("flux-schnell", "transformer"), ("sd-controlnet", "unet")])
def test_compile_recipe_wraps_only_the_denoiser_in_plain_torch_compile(name, denoiser):
    from diffopt.bench.pipelines import build_case

    torch.compiler.reset()
    pipe = build_case(name, size="tiny").stages[0].pipe
    recipes.resolve("compile").apply(pipe)  # lazy: nothing compiles until the first call
    module = getattr(pipe, denoiser)
    assert isinstance(module, torch._dynamo.eval_frame.OptimizedModule)
    assert not isinstance(getattr(pipe, "controlnet", None), torch._dynamo.eval_frame.OptimizedModule)
    if denoiser == "unet":  # plain: the weights keep their layout
        assert module._orig_mod.conv_in.weight.is_contiguous()
    torch.compiler.reset()


def test_classic_recipe_names_the_transformer_it_cannot_run():
    from diffopt.bench.pipelines import build_case

    pipe = build_case("sd3-medium", size="tiny").stages[0].pipe
    with pytest.raises(ValueError, match="classic: SD3Transformer2DModel has no pre-SDPA attention processors"):
        recipes.resolve("classic").apply(pipe)


def test_seed_recipe_wraps_the_denoisers_in_torch_compile_without_compiling_yet():
    from diffopt.bench.pipelines import build_case

    torch.compiler.reset()
    pipe = build_case("sd-controlnet", size="tiny").stages[0].pipe
    recipes.resolve("seed").apply(pipe)  # torch.compile is lazy: nothing compiles until the first call
    for name in ("unet", "controlnet"):
        module = getattr(pipe, name)
        assert isinstance(module, torch._dynamo.eval_frame.OptimizedModule)
        conv = module._orig_mod.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last)
    torch.compiler.reset()


def _quick_bench(out, pipelines: str, recipes: str) -> int:
    """``diffopt bench`` on the CPU with one step, one warm and one timed call; returns its exit status."""
    with torch.backends.mkldnn.flags(enabled=False):
        return main(
            ["bench", "--pipelines", pipelines, "--recipes", recipes, "--steps", "1", "--warmup", "1",
             "--repeats", "1", "--device", "cpu", "--out", str(out)]
        )  # fmt: skip


def test_main_writes_results(tmp_path, capsys):
    out = tmp_path / "out"
    status = _quick_bench(out, "sd-inpaint", "classic,sdpa")
    assert status == 0
    data = json.loads((out / "results.json").read_text())
    assert [(c["pipeline"], c["recipe"], c["status"]) for c in data["cells"]] == [
        ("sd-inpaint", "classic", "ok"),
        ("sd-inpaint", "sdpa", "ok"),
    ]
    assert data["settings"]["size"] == "tiny"  # the CPU default
    assert "SD - inpaint" in (out / "results.md").read_text()
    assert "results.json" in capsys.readouterr().out


def test_python_dash_m_entry_point_shows_bench_options():
    result = subprocess.run(
        [sys.executable, "-m", "diffopt.bench", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert "--batch-sizes" in result.stdout and "--recipes" in result.stdout


def test_main_without_a_command_prints_help(capsys):
    assert main([]) == 2
    assert "bench" in capsys.readouterr().out


def test_merge_combines_runs_split_across_commands(tmp_path, capsys):
    quick = ["--steps", "1", "--warmup", "1", "--repeats", "1", "--device", "cpu"]
    with torch.backends.mkldnn.flags(enabled=False):
        assert main(["bench", "--pipelines", "sdxl", "--recipes", "sdpa", *quick, "--out", str(tmp_path / "a")]) == 0
        argv = ["bench", "--pipelines", "sd-txt2img", "--batch-sizes", "2", "--recipes", "classic,sdpa", *quick]
        assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    merged = tmp_path / "merged"
    assert main(["bench", "--merge", str(tmp_path / "a"), str(tmp_path / "b" / "results.json"), "--out", str(merged)]) == 0
    data = json.loads((merged / "results.json").read_text())
    assert {(c["pipeline"], c["batch_size"], c["recipe"]) for c in data["cells"]} == {
        ("sdxl", 1, "sdpa"),
        ("sd-txt2img", 2, "classic"),
        ("sd-txt2img", 2, "sdpa"),
    }
    assert data["settings"]["batch_sizes"] == [1, 2] and data["settings"]["recipes"] == ["sdpa", "classic"]
    markdown = (merged / "results.md").read_text()
    assert "batch size: 1" in markdown and "batch size: 2" in markdown and "| SD - txt2img |" in markdown
    capsys.readouterr()
    _error(capsys, ["--merge", str(tmp_path / "nothing-here")])


def test_sigterm_ends_the_run_with_what_it_measured(tmp_path, monkeypatch, capsys):
    # What `timeout` does to a run over its limit: SIGTERM, here while torch.compile compiles IF's stage II, where
    # a time limit usually lands and where torch wraps ordinary exceptions in its own.
    import os
    import signal

    def sigterm_while_compiling(pipe):
        if type(pipe).__name__ == "IFSuperResolutionPipeline":

            def backend(graph_module, example_inputs):
                os.kill(os.getpid(), signal.SIGTERM)
                return graph_module.forward

            pipe.unet = torch.compile(pipe.unet, backend=backend)

    monkeypatch.setitem(recipes.RECIPES, "sigterm", sigterm_while_compiling)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    status = _quick_bench(out, "if", "sigterm,sdpa")
    assert status == 124
    assert signal.getsignal(signal.SIGTERM) is before  # the handler lives only as long as the run
    data = json.loads((out / "results.json").read_text())
    (cell,) = data["cells"]
    assert cell["status"] == "interrupted" and [stage["label"] for stage in cell["stages"]] == ["I"]
    assert data["interrupted"].startswith("interrupted (SIGTERM) in first call (stage II)")
    assert "interrupted" in (out / "results.md").read_text()
    assert "stopped" in capsys.readouterr().err


@pytest.mark.parametrize(
    "pipelines, stages, expected",
    [("if", "II,IV", ["'IV'", "'if'", "I, II, III"]), ("if,sd-txt2img", "II", ["'II'", "'sd-txt2img'", "if (I, II, III)"])],
)
def test_stages_not_in_a_pipeline_are_named_before_anything_runs(tmp_path, capsys, pipelines, stages, expected):
    argv = ["bench", "--pipelines", pipelines, "--stages", stages, "--device", "cpu", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    for text in ["--stages", *expected]:
        assert text in str(exit_info.value)
    assert not list(tmp_path.iterdir())  # nothing built, nothing written


def test_stages_with_merge_is_refused(tmp_path):
    (tmp_path / "results.json").write_text("{}")  # --merge only checks that it exists before this refusal
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--merge", str(tmp_path), "--stages", "II", "--out", str(tmp_path / "out")])
    assert "--stages" in str(exit_info.value) and "--merge" in str(exit_info.value)


def test_stages_run_alone_and_merge_into_one_row(tmp_path, capsys):
    # IF's stages each in their own run, as the seed recipe needs on the GPU (each stage compiled in a fresh
    # process); --merge joins them into the row the whole pipeline would have had.
    quick = ["--pipelines", "if", "--recipes", "sdpa", "--steps", "1", "--warmup", "1", "--repeats", "1", "--device", "cpu"]
    with torch.backends.mkldnn.flags(enabled=False):
        assert main(["bench", *quick, "--stages", "II", "--out", str(tmp_path / "ii")]) == 0
        assert main(["bench", *quick, "--stages", "III,I", "--out", str(tmp_path / "i-iii")]) == 0
        assert main(["bench", *quick, "--stages", "I", "--batch-sizes", "2", "--out", str(tmp_path / "i-bs2")]) == 0
    alone = json.loads((tmp_path / "ii" / "results.json").read_text())
    assert [stage["label"] for stage in alone["cells"][0]["stages"]] == ["II"]
    assert "| IF (stage II) |" in (tmp_path / "ii" / "results.md").read_text()
    assert main(["bench", "--merge", str(tmp_path / "ii"), str(tmp_path / "i-iii"), "--out", str(tmp_path / "all")]) == 0
    merged = json.loads((tmp_path / "all" / "results.json").read_text())
    (cell,) = merged["cells"]
    assert [stage["label"] for stage in cell["stages"]] == ["I", "II", "III"]
    (reference,) = merged["references"]
    assert [stage["label"] for stage in reference["stages"]] == ["I", "II", "III"]
    assert "| IF |" in (tmp_path / "all" / "results.md").read_text()
    # Each row names the stages its batch size has: all three at batch 1, stage I alone at batch 2.
    runs = [str(tmp_path / name) for name in ("ii", "i-iii", "i-bs2")]
    assert main(["bench", "--merge", *runs, "--out", str(tmp_path / "rows")]) == 0
    markdown = (tmp_path / "rows" / "results.md").read_text()
    assert "| IF |" in markdown.split("batch size: 2")[0] and "| IF (stage I) |" in markdown.split("batch size: 2")[1]

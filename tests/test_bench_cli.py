"""``diffopt bench`` on the command line: validation names the bad value and the choices; a run writes files.
``diffopt env`` and ``--version``; what the commands leave out of stderr."""
import json
import re
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
        (["--recipes", "sdpa,turbo"], ["'turbo'", "classic", "diffusers-compile", "diffopt", "diffopt-nocompile"]),
        (["--recipes", "diffusers-compile:mode=max"], ["'diffusers-compile' takes no options"]),
        (["--recipes", "diffopt:compile=maybe"], ["compile", "'maybe'", "True, False"]),
        (["--recipes", "diffopt:attention=fast"], ["'fast'", "sdpa", "flash"]),
        (["--recipes", "diffopt:turbo=1"], ["'turbo'", "attention", "compile", "quantize"]),
        (["--recipes", "diffopt:compile"], ["key=value", "'compile'"]),
        (["--recipes", "diffopt:attention=sdpa,attention=flash"], ["'attention'", "twice"]),
        (["--recipes", "diffopt-nocompile:attention=flash"], ["preset", "diffopt:compile=False,attention=flash"]),
        (["--batch-sizes", "1,0"], ["positive integer", "'0'"]),
        (["--batch-sizes", "1,four"], ["'four'"]),
        (["--dtype", "fp8"], ["'fp8'", "bf16", "fp16", "fp32"]),
        (["--size", "huge"], ["'huge'", "full", "tiny"]),
        (["--device", "tpu"], ["'tpu'", "cuda", "cpu"]),
        (["--weights", "/no/such/dir"], ["/no/such/dir"]),
        (["--steps", "-3"], ["'-3'"]),
        (["--height", "500"], ["multiple of 8", "'500'"]),
        (["--width", "0"], ["positive integer", "'0'"]),
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
    # Without --pipelines: the docs page's six on CUDA, not the (much larger) transformer pipelines.
    from diffopt.bench.runner import BenchSettings

    assert BenchSettings(device="cuda").resolved().pipelines == args.pipelines[:6]
    assert args.batch_sizes == [1, 4]
    assert args.recipes == ["sdpa", "diffopt:compile=False,attention=sdpa"]
    assert recipes.resolve(args.recipes[1]).options == {"compile": False, "attention": "sdpa"}


def test_recipe_options_are_python_literals_when_they_parse():
    options = recipes.parse_options("compile=False, mode='max-autotune', attention=sdpa, n=3, sizes=(1, 2)")
    assert options == {"compile": False, "mode": "max-autotune", "attention": "sdpa", "n": 3, "sizes": (1, 2)}
    specs = recipes.split_specs("diffusers-compile,diffopt:a=1,b=(2, 3),c='x,y',diffopt-nocompile")
    assert specs == ["diffusers-compile", "diffopt:a=1,b=(2, 3),c='x,y'", "diffopt-nocompile"]


def test_presets_resolve_to_their_spec_and_compile_flag():
    recipe = recipes.resolve("diffopt-nocompile")
    assert recipe.name == "diffopt-nocompile" and recipe.options == {"compile": False} and not recipe.compiles
    assert recipes.resolve("diffusers-compile").compiles and recipes.resolve("diffopt").compiles
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


def test_help_lists_the_docs_pages_recipe_as_diffusers_compile():
    help_text = build_parser()._subparsers._group_actions[0].choices["bench"].format_help()
    assert "diffusers-compile" in help_text


def test_diffusers_compile_recipe_wraps_the_denoisers_in_torch_compile_without_compiling_yet():
    from diffopt.bench.pipelines import build_case

    torch.compiler.reset()
    pipe = build_case("sd-controlnet", size="tiny").stages[0].pipe
    recipes.resolve("diffusers-compile").apply(pipe)  # torch.compile is lazy: nothing compiles until the first call
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


def test_ctrl_c_prints_and_writes_what_it_finished_and_exits_130(tmp_path, monkeypatch, capsys):
    # Ctrl-C while torch.compile compiles IF's stage II: stage I of that cell was measured and is kept.
    def ctrl_c_while_compiling(pipe):
        if type(pipe).__name__ == "IFSuperResolutionPipeline":

            def backend(graph_module, example_inputs):
                raise KeyboardInterrupt

            pipe.unet = torch.compile(pipe.unet, backend=backend)

    monkeypatch.setitem(recipes.RECIPES, "ctrl-c", ctrl_c_while_compiling)
    out = tmp_path / "out"
    assert _quick_bench(out, "if,sd-txt2img", "ctrl-c,sdpa") == 130
    data = json.loads((out / "results.json").read_text())
    (cell,) = data["cells"]  # nothing after the interrupted cell
    assert cell["status"] == "interrupted" and [stage["label"] for stage in cell["stages"]] == ["I"]
    assert data["interrupted"].startswith("interrupted in first call (stage II)")
    captured = capsys.readouterr()
    assert "interrupted" in (out / "results.md").read_text() and "interrupted" in captured.out  # the table
    assert "Ctrl-C" in captured.err and "Traceback" not in captured.err


def test_ctrl_c_outside_a_cell_exits_130_without_a_traceback(tmp_path, monkeypatch, capsys):
    from diffopt.bench import command

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "run_benchmark", interrupted)
    assert main(["bench", "--device", "cpu", "--out", str(tmp_path)]) == 130
    assert "Ctrl-C" in capsys.readouterr().err


@pytest.mark.parametrize(
    "pipelines, stages, expected",
    [("if", "II,IV", ["'IV'", "'if'", "I, II, III"]), ("if,sd-txt2img", "II", ["'II'", "'sd-txt2img'", "if (I, II, III)"])],
)
def test_stages_not_in_a_pipeline_are_named_before_anything_runs(tmp_path, capsys, pipelines, stages, expected):
    argv = ["bench", "--pipelines", pipelines, "--stages", stages, "--device", "cpu", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for text in ["--stages", *expected]:
        assert text in err
    assert "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing built, nothing written


def test_cuda_device_without_cuda_is_refused_before_anything_runs(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--device", "cuda", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "is_available() is False" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_out_directory_that_cannot_be_written_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch, where):
    from diffopt.bench import command

    def must_not_run(*args, **kwargs):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(command, "run_benchmark", must_not_run)
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a directory")
    out = blocker if where == "a file" else blocker / "run" / "1"
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--device", "cpu", "--out", str(out)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--out" in err and "not a directory" in err and "Traceback" not in err
    assert [p.name for p in tmp_path.iterdir()] == ["results.txt"]


def test_a_stage_runs_alone_and_its_row_says_which(tmp_path, capsys):
    quick = ["--pipelines", "if", "--recipes", "sdpa", "--steps", "1", "--warmup", "1", "--repeats", "1", "--device", "cpu"]
    with torch.backends.mkldnn.flags(enabled=False):
        assert main(["bench", *quick, "--stages", "II", "--out", str(tmp_path / "ii")]) == 0
    alone = json.loads((tmp_path / "ii" / "results.json").read_text())
    assert [stage["label"] for stage in alone["cells"][0]["stages"]] == ["II"]
    assert "| IF (stage II) |" in (tmp_path / "ii" / "results.md").read_text()


def _bench_help() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "diffopt", "bench", "--help"], capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "COLUMNS": "400"},  # one line per option: the regexes read across
    )
    assert result.returncode == 0
    return result.stdout


@pytest.mark.parametrize(
    "option, key", [("--pipelines", "pipelines"), ("--batch-sizes", "batch_sizes"), ("--recipes", "recipes"),
                    ("--dtype", "dtype"), ("--size", "size"), ("--warmup", "warmup"), ("--repeats", "repeats")],
)
def test_help_shows_the_defaults_the_code_uses(option, key):
    import re

    from diffopt.bench.runner import BenchSettings

    blocks = re.split(r"\n  (?=--)", _HELP.get())  # one block per option, its help maybe on the next line
    (line,) = [" ".join(block.split()) for block in blocks if block.startswith(f"{option} ")]
    found = re.search(r"default: (\S+) on CUDA, (\S+) on CPU", line)
    assert found, f"no 'default: X on CUDA, Y on CPU' in {line!r}"
    for shown, device in zip(found.groups(), ("cuda", "cpu")):
        actual = getattr(BenchSettings(device=device).resolved(), key)
        expected = ",".join(map(str, actual)) if isinstance(actual, list) else str(actual)
        assert shown.rstrip(")") == expected, f"{option} on {device}: help says {shown}, the code uses {expected}"


class _HELP:
    text = None

    @classmethod
    def get(cls):
        if cls.text is None:
            cls.text = _bench_help()
        return cls.text


def test_version_and_env_commands(capsys):
    import diffopt

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"diffopt {diffopt.__version__}"
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "diffusers " in out and "torchao " in out and "triton " in out
    for option in ("attention=sdpa", "attention=flash", "attention=auto", "compile", "quantize=int8", "quantize=fp8",
                   "cache=first_block"):
        assert re.search(rf"^{re.escape(option)} +(yes|no: |picks |unknown: )", out, re.MULTILINE), option
    if not torch.cuda.is_available():  # fp8 needs a CUDA card of compute capability 8.9: its reason must say so
        assert re.search(r"^quantize=fp8 +no: .*compute capability", out, re.MULTILINE)
    # The suite runs with DIFFOPT_CACHE_DIR=off (conftest): env says the compile cache is off, and why.
    assert re.search(r"^compile_cache +off \(DIFFOPT_CACHE_DIR='off'\)", out, re.MULTILINE)


def test_env_names_the_compile_cache_directory(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DIFFOPT_CACHE_DIR", str(tmp_path))
    (tmp_path / "entry").mkdir()
    (tmp_path / "entry" / "meta.json").write_text("{}")
    assert main(["env"]) == 0
    assert re.search(rf"^compile_cache +{re.escape(str(tmp_path))} \(1 saved compiles", capsys.readouterr().out, re.MULTILINE)


def test_env_prints_a_failing_gate_instead_of_crashing(monkeypatch, capsys):
    from diffopt import capabilities

    def broken():
        raise RuntimeError("gate exploded")

    monkeypatch.setattr(capabilities, "compile", broken)
    assert main(["env"]) == 0
    assert re.search(r"^compile +unknown: RuntimeError: gate exploded$", capsys.readouterr().out, re.MULTILINE)


NOISE = ["_C_mxfp8", "Failed to load", "is an Enum subclass", "Unable to import `torchao` Tensor objects",
         "value range in [-1,1] is deprecated", "requires torchvision (not installed)"]


def test_quiet_drops_the_torchvision_fallback_notice_only_inside_its_block(caplog):
    import logging

    from diffopt.quiet import quiet_third_party

    logger = logging.getLogger("transformers.utils.import_utils")
    notice = ("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` "
              "for backward compatibility.")  # fmt: skip
    with caplog.at_level(logging.WARNING, logger=logger.name):
        with quiet_third_party():
            logger.warning(notice)
            logger.warning("another transformers warning")
        logger.warning(notice)
    assert [record.getMessage() for record in caplog.records] == ["another transformers warning", notice]


def test_env_command_prints_no_third_party_noise():
    result = subprocess.run([sys.executable, "-m", "diffopt", "env"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "quantize=int8" in result.stdout
    assert not [noise for noise in NOISE if noise in result.stderr], result.stderr


def test_bench_on_if_prints_no_third_party_noise(tmp_path):
    # IF's stage II is where diffusers warns about the image range; the diffopt recipe imports torchao.
    argv = ["bench", "--pipelines", "if", "--recipes", "sdpa,diffopt-nocompile", "--steps", "1", "--warmup", "1",
            "--repeats", "1", "--device", "cpu", "--out", str(tmp_path)]
    result = subprocess.run([sys.executable, "-m", "diffopt", *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not [noise for noise in NOISE if noise in result.stderr], result.stderr


def test_import_diffopt_leaves_warnings_and_logging_alone():
    # torch and numpy add filters of their own when imported: import them first, then compare.
    code = ("import logging, warnings, torch, diffusers; before = list(warnings.filters); import diffopt, diffopt.cli; "
            "assert warnings.filters == before; assert not logging.getLogger('torchao').filters; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr


def test_env_says_when_the_compile_cache_directory_cannot_be_used(tmp_path, monkeypatch):
    from diffopt.env_report import compile_cache_line

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DIFFOPT_CACHE_DIR", str(blocker / "cache"))
    line = compile_cache_line()
    assert "is not a directory" in line and "will not be saved" in line and str(blocker) in line
    monkeypatch.setenv("DIFFOPT_CACHE_DIR", str(tmp_path / "new" / "cache"))
    assert "0 saved compiles" in compile_cache_line() and not (tmp_path / "new").exists()

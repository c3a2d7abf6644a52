"""benchmarks/merge_runs.py: runs split across commands (by pipeline, batch size or IF stage) join into one."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from diffopt.bench import output
from diffopt.bench.measure import CellResult, Reference, StageReference, StageResult
from diffopt.bench.runner import BenchRun, BenchSettings
from diffopt.cli import main

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "merge_runs.py"
_spec = importlib.util.spec_from_file_location("merge_runs", SCRIPT)
merge_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(merge_script)
merge_runs = merge_script.merge_runs

QUICK = dict(device="cpu", size="tiny", steps=1, warmup=1, repeats=2)
QUICK_ARGS = ["--steps", "1", "--warmup", "1", "--repeats", "1", "--device", "cpu"]


def _stage(label, seconds):
    return StageResult(label, 1, 10, 1.0, [seconds], seconds, 10 / seconds)


def test_merge_combines_runs_split_across_commands(tmp_path, capsys):
    with torch.backends.mkldnn.flags(enabled=False):
        assert main(["bench", "--pipelines", "sdxl", "--recipes", "sdpa", *QUICK_ARGS, "--out", str(tmp_path / "a")]) == 0
        argv = ["bench", "--pipelines", "sd-txt2img", "--batch-sizes", "2", "--recipes", "classic,sdpa", *QUICK_ARGS]
        assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    merged = tmp_path / "merged"
    assert merge_script.main([str(tmp_path / "a"), str(tmp_path / "b" / "results.json"), "--out", str(merged)]) == 0
    data = json.loads((merged / "results.json").read_text())
    assert {(c["pipeline"], c["batch_size"], c["recipe"]) for c in data["cells"]} == {
        ("sdxl", 1, "sdpa"),
        ("sd-txt2img", 2, "classic"),
        ("sd-txt2img", 2, "sdpa"),
    }
    assert data["settings"]["batch_sizes"] == [1, 2] and data["settings"]["recipes"] == ["sdpa", "classic"]
    markdown = (merged / "results.md").read_text()
    assert "batch size: 1" in markdown and "batch size: 2" in markdown and "| SD - txt2img |" in markdown
    with pytest.raises(SystemExit) as exit_info:
        merge_script.main([str(tmp_path / "nothing-here"), "--out", str(merged)])
    assert exit_info.value.code == 2 and "nothing-here" in capsys.readouterr().err


def test_stages_run_alone_merge_into_one_row(tmp_path):
    quick = ["--pipelines", "if", "--recipes", "sdpa", *QUICK_ARGS]
    with torch.backends.mkldnn.flags(enabled=False):
        assert main(["bench", *quick, "--stages", "II", "--out", str(tmp_path / "ii")]) == 0
        assert main(["bench", *quick, "--stages", "III,I", "--out", str(tmp_path / "i-iii")]) == 0
        assert main(["bench", *quick, "--stages", "I", "--batch-sizes", "2", "--out", str(tmp_path / "i-bs2")]) == 0
    assert merge_script.main([str(tmp_path / "ii"), str(tmp_path / "i-iii"), "--out", str(tmp_path / "all")]) == 0
    merged = json.loads((tmp_path / "all" / "results.json").read_text())
    (cell,) = merged["cells"]
    assert [stage["label"] for stage in cell["stages"]] == ["I", "II", "III"]
    (reference,) = merged["references"]
    assert [stage["label"] for stage in reference["stages"]] == ["I", "II", "III"]
    assert "| IF (stages I / II / III) |" in (tmp_path / "all" / "results.md").read_text()
    # Each row names the stages its batch size has: all three at batch 1, stage I alone at batch 2.
    runs = [str(tmp_path / name) for name in ("ii", "i-iii", "i-bs2")]
    assert merge_script.main([*runs, "--out", str(tmp_path / "rows")]) == 0
    markdown = (tmp_path / "rows" / "results.md").read_text()
    assert "| IF (stages I / II / III) |" in markdown.split("batch size: 2")[0]
    assert "| IF (stage I) |" in markdown.split("batch size: 2")[1]


def test_merge_keeps_a_finished_cell_over_a_later_interrupted_one():
    from diffopt.bench.measure import CellResult

    settings = BenchSettings(pipelines=["if"], batch_sizes=[1], recipes=["diffusers-compile"], **QUICK)
    finished = CellResult("if", 1, "diffusers-compile")
    stopped = CellResult("if", 1, "diffusers-compile", status="interrupted", error="interrupted in first call (stage II)")
    retried = CellResult("if", 1, "diffusers-compile", status="error", error="RuntimeError in first call: boom")

    def runs(*cells):
        return [BenchRun(settings, {}, None, [], [cell]) for cell in cells]

    assert merge_runs(runs(finished, stopped)).cells == [finished]
    assert merge_runs(runs(stopped, finished)).cells == [finished]
    assert merge_runs(runs(finished, retried)).cells == [retried]  # any other later measurement wins, as documented



def test_merge_joins_other_stages_but_never_the_same_stage_twice():
    from diffopt.bench.measure import CellResult

    settings = BenchSettings(pipelines=["if"], batch_sizes=[1], recipes=["diffusers-compile"], **QUICK)
    first = CellResult("if", 1, "diffusers-compile", peak_memory_bytes=5, notes=["I: a"], stages=[_stage("I", 1.0)])
    rest = CellResult("if", 1, "diffusers-compile", peak_memory_bytes=9, notes=["III: c"], stages=[_stage("III", 3.0), _stage("II", 2.0)])
    again = CellResult("if", 1, "diffusers-compile", peak_memory_bytes=1, stages=[_stage("II", 2.5)])
    stopped = CellResult("if", 1, "diffusers-compile", status="interrupted", stages=[_stage("II", 2.5)])

    def merged(*cells):
        return merge_runs([BenchRun(settings, {}, None, [], [cell]) for cell in cells]).cells

    (joined,) = merged(rest, first)
    assert [stage.label for stage in joined.stages] == ["I", "II", "III"]
    assert joined.peak_memory_bytes == 9 and joined.notes == ["III: c", "I: a"]  # each stage ran in its own process
    assert merged(rest, again) == [again]  # stage II twice: the later measurement wins, as for any cell
    assert merged(first, stopped) == [first]  # an interrupted cell is never joined: the finished one stays



def test_merge_resumes_an_interrupted_cell_with_the_stages_it_did_not_reach():
    from diffopt.bench.measure import CellResult, Reference, StageReference

    def reference(*labels, error=None):
        return Reference("if", 1, [StageReference(label, 10, None, None, None) for label in labels], error)

    full = BenchSettings(pipelines=["if"], batch_sizes=[1], recipes=["diffusers-compile"], **QUICK)
    rest = BenchSettings(pipelines=["if"], batch_sizes=[1], recipes=["diffusers-compile"], stages=["II", "III"], **QUICK)
    stopped = CellResult("if", 1, "diffusers-compile", status="interrupted", error="interrupted in first call (stage II)",
                         traceback="...", stages=[_stage("I", 1.0)])
    resumed = CellResult("if", 1, "diffusers-compile", stages=[_stage("II", 2.0), _stage("III", 3.0)])
    only_iii = CellResult("if", 1, "diffusers-compile", stages=[_stage("III", 3.0)])
    runs = [BenchRun(full, {}, None, [reference("I", "II", "III")], [stopped]),
            BenchRun(rest, {}, None, [reference("II", "III")], [resumed])]
    merged = merge_runs(runs)
    (cell,) = merged.cells
    assert [stage.label for stage in cell.stages] == ["I", "II", "III"] and cell.ok and cell.error is None
    assert [stage.label for stage in merged.references[0].stages] == ["I", "II", "III"]  # not cut to II, III
    assert merged.settings.stages is None  # one run timed every stage
    assert output.table_rows(merged, 1)[0][0] == "IF (stages I / II / III)"
    # Stage II never measured: nothing resumes, the later cell wins whole.
    gap = merge_runs([runs[0], BenchRun(rest, {}, None, [], [only_iii])])
    assert [stage.label for stage in gap.cells[0].stages] == ["III"]


def test_a_failed_reference_neither_replaces_a_good_one_nor_labels_the_row():
    from diffopt.bench.measure import CellResult, Reference, StageReference

    settings = BenchSettings(pipelines=["if"], batch_sizes=[1], recipes=["diffusers-compile"], **QUICK)
    good = Reference("if", 1, [StageReference(label, 10, None, None, None) for label in ("I", "II", "III")])
    failed = Reference("if", 1, [StageReference("I", 10, None, None, None)], error="OutOfMemoryError in reference call")
    cell = CellResult("if", 1, "diffusers-compile", stages=[_stage("I", 1.0), _stage("II", 2.0), _stage("III", 3.0)])
    merged = merge_runs([BenchRun(settings, {}, None, [good], [cell]), BenchRun(settings, {}, None, [failed], [])])
    assert merged.references == [good]
    alone = BenchRun(settings, {}, None, [failed], [cell])  # the reference ran out of memory after stage I
    assert output.table_rows(alone, 1)[0][0] == "IF (stages I / II / III)"

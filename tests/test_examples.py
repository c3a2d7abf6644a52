"""The examples are documentation that runs: examples/quickstart.py (the README's third command) and
examples/quickstart.ipynb must keep working, and keep saying what the docs say they say."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# Optimizations change float32 rounding, never the result: anything above this is a wrong output.
MAX_REL_DIFF = 1e-4


def run_quickstart(*flags, timeout=300):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), *flags],
        capture_output=True, text=True, timeout=timeout, cwd=EXAMPLES.parent,
    )
    assert done.returncode == 0, f"quickstart.py {' '.join(flags)} failed:\n{done.stdout}\n{done.stderr}"
    # stderr too: diffopt logs its compile ("diffopt: compiled unet in ...") as a warning, which lands there.
    return done.stdout + "\n" + done.stderr


def row(output, transform, status, detail=r".*"):
    """True when a report in ``output`` has the row ``unet  <transform>  <status>  <detail>``."""
    return re.search(rf"^unet\s+{transform}\s+{status}\s+{detail}$", output, re.MULTILINE) is not None


def number(output, pattern):
    found = re.search(pattern, output)
    assert found, f"{pattern!r} not in the output:\n{output}"
    return float(found.group(1))


def check_common(out):
    """What every quickstart run must print: speeds, a small difference, and a restore that matched."""
    assert row(out, "memory_format", "applied", r"\d+ 4-D weights -> channels_last")
    assert row(out, "memory_format", "applied", "undone"), "restore did not undo the memory format"
    assert row(out, "attention", "applied", r"\d+x AttnProcessor2_0 -> AttnProcessor"), "restore left SDPA"
    assert number(out, r"eager\s+:\s+([\d.]+) steps/s") > 0
    assert number(out, r"optimized\s+:\s+([\d.]+) steps/s") > 0
    assert 0 < number(out, r"relative L2 of latents vs eager = ([\d.e+-]+)") < MAX_REL_DIFF
    assert re.search(r"^restore\s+: matches eager .*attention processors: AttnProcessor$", out, re.MULTILINE), out
    assert number(out, r"restore\s+: matches eager \(relative L2 = ([\d.e+-]+)\)") < MAX_REL_DIFF


def test_quickstart_without_compile():
    out = run_quickstart("--no-compile", "--steps", "2")
    check_common(out)
    assert not row(out, "compile", r"\w+"), "--no-compile still compiled"
    assert "(no compile)" in out
    assert "diffopt: compiled" not in out


@pytest.mark.compile
def test_quickstart_with_inductor_compile():
    # The default command, with fewer steps: inductor compiles the tiny UNet (tens of seconds on a CPU).
    out = run_quickstart("--steps", "2", timeout=600)
    check_common(out)
    assert row(out, "compile", "applied", re.escape("torch.compile(fullgraph=True)"))
    assert row(out, "compile", "applied", "undone"), "restore did not undo the compile"
    # The compiled call logs this once its first call, the one that compiles, has returned: proof that the
    # compiled forward ran, where the time of that call would only have been a guess.
    assert re.search(r"^diffopt: compiled unet in [\d.]+ s$", out, re.MULTILINE), out


def test_notebook_is_committed_with_its_outputs():
    # Readers on GitHub see the outputs without running anything; test_notebook_runs checks they still come out.
    import nbformat

    nb = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    printing = [c for c in code if "print(" in c.source]
    assert printing and all(c.outputs and c.execution_count for c in printing), "run the notebook and save it"
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert "restored matches eager exactly: True" in text and "Traceback" not in text


def test_notebook_runs(tmp_path, monkeypatch):
    import json
    import sys

    import nbclient
    import nbformat

    # A kernel that runs this very interpreter: an installed "python3" kernelspec may point at another one.
    spec = tmp_path / "kernels" / "diffopt-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "diffopt test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))  # searched before the user's and the system's kernels
    nb = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="diffopt-test", resources={"metadata": {"path": str(EXAMPLES)}},
    )
    for cell in nb.cells:  # the committed outputs must not pass for this run's
        if cell.cell_type == "code":
            cell.outputs = []
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert all(c.outputs for c in nb.cells if c.cell_type == "code" and "print(" in c.source)
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert re.search(r"^unet\s+compile\s+applied\s+torch\.compile\(fullgraph=True, backend='aot_eager'\)$", text, re.MULTILINE)
    assert "graphs compiled by the second optimize: 0" in text
    assert "same output as the first optimize: True" in text
    assert "pipe.unet is unet: True" in text
    assert "attention processors: ['AttnProcessor2_0']" in text.split("diffopt.restore:")[-1]
    assert "restored matches eager exactly: True" in text

"""Draw the time-to-first-image chart of docs/benchmarks.md from first_image.py's JSON results: one line per
``<name>.json`` of LABELS found in the directory. A run made with ``--for`` is drawn from every call's time; the
others from the first call and the steady time.

    python benchmarks/first_image_chart.py benchmarks/results/2026-11-29-h200-first-image docs/first_image.png
    python benchmarks/first_image_chart.py benchmarks/results/2026-11-30-h200-background-default/run1-sd15 docs/background_compile.png 240
"""
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"eager": "eager SDPA", "docs": "diffusers' torch.compile recipe, cold", "cold": "diffopt, cold",
          "warm": "diffopt, saved compile", "background": "diffopt, background_compile=True, cold",
          "default-cold": "diffopt (compile in the background), cold",
          "foreground-cold": "diffopt, background_compile=False, cold",
          "default-warm": "diffopt (compile in the background), saved compile"}  # fmt: skip


def seconds_to_each_image(run: dict, images: int) -> list:
    """Seconds from optimize() to the end of each of the first ``images`` calls (batch 1)."""
    shape = run["shapes"][0]
    calls = list(shape.get("calls_s") or [shape["first_call_s"]])
    calls += [shape["steady_s"]] * (images - len(calls))  # past the recorded calls: the steady time
    total, ends = run["optimize_s"], []
    for seconds in calls[:images]:
        total += seconds
        ends.append(total)
    return ends


def main(results: str, out: str, images: int = 40) -> None:
    found = {name: pathlib.Path(results) / f"{name}.json" for name in LABELS}
    runs = {name: json.loads(path.read_text()) for name, path in found.items() if path.exists()}
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for name, run in runs.items():
        axis.plot(range(1, images + 1), seconds_to_each_image(run, images), label=LABELS[name])
    first = next(iter(runs.values()))
    model = {"sd15": "SD1.5, 512 px, 50 steps", "sdxl": "SDXL, 1024 px, 30 steps"}.get(first["model"], first["model"])
    axis.set_xlabel(f"images generated ({model}, batch 1)")
    axis.set_ylabel("seconds since optimize()")
    axis.set_title(f"Time to the n-th image, {first['gpu']}, torch {first['torch'].split('+')[0]}, diffusers {first['diffusers']}")
    axis.grid(alpha=0.3)
    figure.legend(loc="lower center", ncol=2, bbox_to_anchor=(0.5, 0.0), frameon=False)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    figure.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *[int(n) for n in sys.argv[3:4]])

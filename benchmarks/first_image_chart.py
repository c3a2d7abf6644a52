"""Draw the time-to-first-image chart of docs/benchmarks.md from first_image.py's JSON results.

    python benchmarks/first_image_chart.py benchmarks/results/2026-11-29-h200-first-image docs/first_image.png
"""
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {"eager": "eager SDPA", "docs": "diffusers' torch.compile recipe, cold", "cold": "diffopt, cold",
          "warm": "diffopt, saved compile"}  # fmt: skip


def main(results: str, out: str, images: int = 40) -> None:
    runs = {name: json.loads((pathlib.Path(results) / f"{name}.json").read_text()) for name in LABELS}
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for name, run in runs.items():
        shape = run["shapes"][0]
        start = run["optimize_s"] + shape["first_call_s"]
        counts = list(range(1, images + 1))
        axis.plot(counts, [start + (n - 1) * shape["steady_s"] for n in counts], label=LABELS[name])
    first = next(iter(runs.values()))
    axis.set_xlabel("images generated (SD1.5, 512 px, 50 steps, batch 1)")
    axis.set_ylabel("seconds since optimize()")
    axis.set_title(f"Time to the n-th image, {first['gpu']}, torch {first['torch'].split('+')[0]}, diffusers {first['diffusers']}")
    axis.grid(alpha=0.3)
    figure.legend(loc="lower center", ncol=2, bbox_to_anchor=(0.5, 0.0), frameon=False)
    figure.tight_layout(rect=(0, 0.12, 1, 1))
    figure.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

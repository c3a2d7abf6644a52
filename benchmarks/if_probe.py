"""Where DeepFloyd IF's time goes on the GPU host: per stage, the first call (compile), the second (CUDA-graph
recording) and three timed calls, printed as each finishes.
Usage: python3 benchmarks/if_probe.py RECIPE STEPS [STAGES], STAGES like "II,III" (default: all three, in order)."""
import sys
import time

import torch

from diffopt.bench.pipelines import build_case
from diffopt.bench.recipes import resolve


def main(recipe: str, steps: int, stages: str = "I,II,III") -> None:
    start = time.perf_counter()
    cuda = torch.cuda.is_available()  # a CPU runs the tiny configs, to check this script
    case = build_case("if", "full" if cuda else "tiny", "cuda" if cuda else "cpu", torch.float16 if cuda else torch.float32, steps)
    print(f"built in {time.perf_counter() - start:.1f}s", flush=True)
    for stage in [stage for stage in case.stages if stage.label in stages.split(",")]:
        print(resolve(recipe).apply(stage.pipe), flush=True)
        for call in ("first", "second", "timed", "timed", "timed"):
            torch.cuda.synchronize() if cuda else None
            begin = time.perf_counter()
            stage.call(1, stage.timed_output)
            torch.cuda.synchronize() if cuda else None
            seconds = time.perf_counter() - begin
            print(f"STAGE {stage.label} {call} call {seconds:.1f}s ({steps / seconds:.1f} steps/s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])

#!/usr/bin/env bash
# `diffopt bench` on the GPU host, split into invocations that each write their own results (so a timeout in
# one keeps the others). Usage: bash benchmarks/gpu_bench.sh NAME:SECONDS:"bench args" ...
set -u
# Installed once per machine, so that several invocations can run side by side (one per GPU, CUDA_VISIBLE_DEVICES).
# Their cold compiles then share the host's CPUs and each takes longer: run compile-bound invocations one after another.
if [ ! -e /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.installed || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
out=${OUT:-bench-out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
for spec in "$@"; do
  name=${spec%%:*}; rest=${spec#*:}; secs=${rest%%:*}; args=${rest#*:}
  start=$(date +%s)
  # shellcheck disable=SC2086
  # SIGINT (Ctrl-C) at the limit: the bench writes what it finished (stages included); KILL 30 s later if it hangs.
  timeout -s INT -k 30 "$secs" python3 -m diffopt.bench $args --out "$out/$name" 2>&1 | grep -vE "━|torchvision" | tail -40
  echo "# $name wall $(( $(date +%s) - start ))s"
done

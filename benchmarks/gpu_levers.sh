#!/usr/bin/env bash
# Lever sweep: the baseline script and each lever of benchmarks/levers.py, one process each, in one run.
# Usage on the device (wheels from ../shared/gpu/prepare-wheels.sh carried in .whl/):  bash benchmarks/gpu_levers.sh BATCH VARIANTS...
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1
out=${OUT:-bench-out}; mkdir -p "$out"
batch=$1; shift
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$out/levers.log"
for v in "$@"; do
  case $v in
    anchor:*) cmd=(python3 benchmarks/anchors/bench_anchor.py "${v#anchor:}" sd15 "$batch" 50) ;;
    *) cmd=(python3 benchmarks/levers.py "$v" "$batch" 50) ;;
  esac
  start=$(date +%s)
  timeout "${LEVER_TIMEOUT:-110}" "${cmd[@]}" 2>&1 | grep -E "RESULT|PROFILE|Error|error:|Traceback" | tail -3 | tee -a "$out/levers.log"
  echo "# $v wall $(( $(date +%s) - start ))s" | tee -a "$out/levers.log"
done

#!/usr/bin/env bash
# Every variant of benchmarks/vae_decode.py in its own process with new empty inductor and triton caches, so
# each first decode is a cold compile. Results: $OUT/vae_decode.jsonl (or ./bench-out).
set -u
out=${OUT:-bench-out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/vae_decode.log"
run() {
  local cache; cache=$(mktemp -d)
  TORCHINDUCTOR_CACHE_DIR=$cache/inductor TRITON_CACHE_DIR=$cache/triton timeout 240 \
    python3 benchmarks/vae_decode.py "$@" 2>>"$out/vae_decode.log" | grep RESULT | sed 's/^RESULT //' | tee -a "$out/vae_decode.jsonl"
  rm -rf "$cache"
}
for batch in 1 4; do
  for v in eager channels_last compile compile-cudagraphs; do run "$v" sd15 "$batch"; done
done
for dtype in fp32 fp16; do
  for v in eager channels_last compile; do run "$v" sdxl 1 --dtype "$dtype"; done
done

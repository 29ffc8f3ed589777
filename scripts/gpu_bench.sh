#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md, ready to run on a fresh GPU machine that has torch but no network:
#
#   scripts/gpu_bench.sh [OUT]         # qwen2.5-vl-3b and qwen3-vl-4b shapes, 800x600 charts (about 6 minutes
#                                      # on one H100/H200: random models built on the GPU, then both benches)
#   scripts/gpu_bench.sh --cpu [OUT]   # the same steps on the CPU with tiny presets: a check of the script
#
# Packages the machine lacks travel as wheels in .whl/ (installed into /tmp/site, nothing else touched); make
# them where pip works (see BENCHMARKS.md, "GPU rows"). Results: OUT/*.json and OUT/BENCHMARKS.md (default OUT:
# output/gpu-bench). The training bench runs seed, fast and packed, plus, where their packages are installed,
# flash-attention (varlen for packed rows) and Liger's kernels and fused linear cross-entropy; bf16 throughout.
set -euo pipefail
cd "$(dirname "$0")/.."

cpu=""
if [ "${1:-}" = "--cpu" ]; then cpu=1; shift; fi
out="${1:-output/gpu-bench}"
mkdir -p "$out"
python="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" > /dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

has() { "$python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"; }

if [ -n "$cpu" ]; then
  presets="tiny tiny-qwen3-vl"
  common=(--cpu --charts 8 --min_pixels 3136 --max_pixels 50176)
  train=(--samples 4 --train_batch_size 2 --recipes seed,fast,packed)
  evaluate=(--questions 4 --batch_size 2 --max_new_tokens 4 --recipes seed,fast)
else
  "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || {
    echo "no CUDA device: run with --cpu for the CPU check" >&2; exit 2; }
  recipes="seed,fast,packed"
  if has flash_attn; then recipes="$recipes,fast+flash-attn,packed+flash-attn"; fi
  if has liger_kernel; then recipes="$recipes,fast+liger,fast+liger-flce"; fi
  presets="qwen2.5-vl-3b qwen3-vl-4b"
  common=(--charts 64 --image_size 800x600)
  train=(--samples 32 --train_batch_size 8 --recipes "$recipes")
  evaluate=(--questions 32 --batch_size 16 --recipes seed,fast)
fi

for preset in $presets; do
  "$python" -m chartvlm.cli bench train --preset "$preset" "${common[@]}" "${train[@]}" \
    --out "$out" --markdown "$out/BENCHMARKS.md"
  "$python" -m chartvlm.cli bench eval --preset "$preset" "${common[@]}" "${evaluate[@]}" \
    --out "$out" --markdown "$out/BENCHMARKS.md"
done
echo "results: $out/BENCHMARKS.md and $out/*.json"

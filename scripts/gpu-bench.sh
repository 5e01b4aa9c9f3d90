#!/usr/bin/env bash
# One-shot GPU benchmark for a session with a CUDA device (H100/H200 class). Run from the
# repository root with the project's venv built with a CUDA torch; writes JSON next to the log.
#   scripts/gpu-bench.sh [OUT_DIR]
# Goals (issue 12): ViT-B/14 at 518 px >= 1,800 img/s (bfloat16 autocast + TF32 by default on
# CUDA), and ours >= 1.5x transformers' Dinov2Model on the same input and dtype.
set -euo pipefail
OUT="${1:-${OUT:-gpu-bench-out}}"
mkdir -p "$OUT"
PA="${PACS_AGENT:-.venv/bin/pacs-agent}"
[ -x "$PA" ] || PA="pacs-agent"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
run() { echo "+ $*" | tee -a "$OUT/log.txt"; "$@" 2>&1 | tee -a "$OUT/log.txt"; }
# Encoder alone: throughput and TFLOP/s, ViT-B/14 at 518 px, batches up to 256, bf16 (auto).
run "$PA" bench encoder --device cuda --models B --sizes 518 --batch 32 64 128 256 \
    --rounds 10 --json "$OUT/encoder-b518.json"
# Same with torch.compile (PACS_AGENT_TORCH_COMPILE's modes); the first call compiles.
run "$PA" bench encoder --device cuda --models B --sizes 518 --batch 64 128 \
    --compile max-autotune-no-cudagraphs --rounds 10 --json "$OUT/encoder-b518-compiled.json"
# Ours vs transformers' Dinov2Model (SDPA), same weights and input, float32 and bfloat16.
run "$PA" bench encoder --device cuda --models B --sizes 518 --batch 64 --dtype float32 \
    --compare-transformers --rounds 10 --json "$OUT/compare-fp32.json"
run "$PA" bench encoder --device cuda --models B --sizes 518 --batch 64 --dtype bfloat16 \
    --compare-transformers --rounds 10 --json "$OUT/compare-bf16.json"
# End to end (another engineer's bench pipeline): decode pool, model, writers.
run "$PA" bench pipeline --device cuda --json "$OUT/pipeline.json"
echo "done: $OUT"

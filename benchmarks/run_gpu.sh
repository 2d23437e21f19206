#!/usr/bin/env bash
# The DiT benchmark on a lent GPU: bf16, real width (24 x 128 = 3072, text 3584), 2 blocks, 1024x1024 edit
# (4096 target + 4096 edit-image tokens). Extra arguments pass through (e.g. --iters 20).
# On a device machine with $OUT set, the updated BENCHMARKS.md is written there so that it comes back.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUTPUT=BENCHMARKS.md
if [ -n "${OUT:-}" ]; then
  [ -f BENCHMARKS.md ] && cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
  OUTPUT="$OUT/BENCHMARKS.md"
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/bench_dit.py \
  --device cuda --dtype bf16 --num_layers 2 --height 1024 --width 1024 --text_len 160 \
  --warmup 3 --iters 10 --output "$OUTPUT" "$@"
# Memory (issue 11): the 60-block step with block swap and fp8, planner vs measured, an inference step with swap;
# at most 110 s (--budget_s stops starting rows at 95 s; the section is rewritten after every row).
timeout -k 5 110 env PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/bench_memory.py --budget_s 95 \
  --output "$OUTPUT" || echo "run_gpu: bench_memory stopped (exit $?); BENCHMARKS.md keeps the rows it finished" >&2

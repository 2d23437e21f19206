#!/usr/bin/env bash
# The GPU benchmark suite in one call: under 6 minutes on one H100/H200, rewriting BENCHMARKS.md.
#
#   bash benchmarks/run_gpu.sh          on the GPU machine (with $OUT set, BENCHMARKS.md is written there)
#   bash benchmarks/run_gpu.sh --dry    CPU, toy sizes, no timing value: checks that the script runs
#                                       (tests/test_benchmarks.py; BENCH_OUTPUT=<file> writes elsewhere)
#
# Time plan (seconds, hard limits): wheels 30 | bench_dit 8 blocks + 60 blocks 220 | bench_memory 100.
# bench_dit rewrites its sections after every flavour, so a stage cut short by its limit keeps what it measured,
# and flavours that would start past their budget are listed as skipped. Extra arguments go to bench_dit.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
DRY=0
if [ "${1:-}" = "--dry" ]; then
  DRY=1
  shift
fi
OUTPUT="${BENCH_OUTPUT:-BENCHMARKS.md}"
if [ -n "${OUT:-}" ] && [ -z "${BENCH_OUTPUT:-}" ]; then
  [ -f BENCHMARKS.md ] && cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
  OUTPUT="$OUT/BENCHMARKS.md"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$SECONDS

# 0. diffusers, which the GPU machine lacks, from wheels carried in .whl/ (benchmarks/README.md says how to get
#    them). Without it the diffusers rows are skipped with a message.
if [ -d .whl ] && ! "$PYTHON" -c "import diffusers" 2>/dev/null; then
  timeout 30 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site" \
    || echo "run_gpu: could not install the wheels in .whl/; the diffusers rows will be skipped" >&2
fi

# 1. bench_dit: 8 blocks (standard / merged / diffusers x eager / compiled / fp8 compute, LoRA step first, then
#    forward), then the merged DiT at 60 blocks with gradient checkpointing (bf16, fp8 storage, fp8 compute;
#    compiled or not). One process, so the 60-block run reuses the 8-block run's compiled block graphs.
if [ "$DRY" = 1 ]; then
  DIT=(--device cpu --dtype fp32 --num_layers 1 --heads 2 --head_dim 32 --text_dim 64 --height 64 --text_len 8
       --rank 4 --warmup 1 --iters 2 --flavors eager,fp8_compiled --compile_backend eager --profile fp8_compiled
       --full_layers 2 --full_flavors eager,fp8_compiled,fp8_compiled:1,fp8_compiled:selective --full_warmup 1
       --full_iters 1)
  LIMIT=300
else
  # Flavour by flavour (eager: LoRA step and forward, then compiled: step, profile, forward, then fp8 compute),
  # most informative first; fp8 compute without compile is left out (measured: slower than fp8 storage). The
  # 60-block section: the goal rows first (compiled, fp8 compute compiled), then the same with the attention outputs
  # kept (--selective_checkpointing), then with only the last 35 / 45 blocks checkpointed (--blocks_to_checkpoint;
  # fewer than the planner's 80 GB picks, 18 / 34 with --selective_checkpointing, to leave room for what an earlier
  # flavour may still hold), then fp8 storage compiled, eager.
  DIT=(--device cuda --dtype bf16 --num_layers 8 --height 1024 --width 1024 --text_len 160 --rank 32
       --modes train,forward --flavors eager,compiled,fp8_compiled --warmup 2 --iters 5 --budget_s 120
       --profile compiled
       --full_layers 60
       --full_flavors compiled,fp8_compiled,compiled:selective,fp8_compiled:selective,fp8_compiled:35,compiled:45,fp8_storage_compiled,eager
       --full_warmup 2 --full_iters 3 --full_budget_s 60)
  LIMIT="${BENCH_DIT_LIMIT:-220}"  # a longer lease may allow more (with larger --budget_s / --full_budget_s)
fi
timeout -k 5 "$LIMIT" "$PYTHON" benchmarks/bench_dit.py "${DIT[@]}" --section bench_dit_gpu --output "$OUTPUT" "$@" \
  || echo "run_gpu: bench_dit stopped (exit $?); BENCHMARKS.md keeps the flavours it finished" >&2

# 2. Memory (issue 11's slot, at most 100 s): the 60-block step with block swap and fp8, planner vs measured, an
#    inference step with swap (--budget_s stops starting rows at 85 s; the section is rewritten after every row).
#    Swaps 0 and 16 in bf16 and fp8, plus the planner's 80 GB pick in bf16 (--blocks_to_checkpoint: fewer blocks
#    recomputed) and its 24 / 16 GB picks in fp8.
if [ "$DRY" = 1 ]; then
  MEMORY=(--preset tiny)
else
  MEMORY=(--budget_s 85 --swaps 0,16)
fi
timeout -k 5 100 "$PYTHON" benchmarks/bench_memory.py "${MEMORY[@]}" --output "$OUTPUT" \
  || echo "run_gpu: bench_memory stopped (exit $?); BENCHMARKS.md keeps the rows it finished" >&2

echo "run_gpu: done in $((SECONDS - START)) s; results in $OUTPUT"

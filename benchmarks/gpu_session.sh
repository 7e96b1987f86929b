#!/usr/bin/env bash
# Issue 26's GPU checks in one run (the device tool's H200, or any CUDA machine with torch and
# transformers installed): the environment, `pytest -m gpu`, then benchmarks/bench_gpu.py (compiled rows, then all).
# Usage: bash benchmarks/gpu_session.sh [BENCH_BUDGET_S]   (logs and JSON under $OUT, else ./gpu-out;
# the defaults keep the whole script within the device tool's 600 s a call: pytest 170 s at worst, then
# bench_gpu.py --compiled (COMPILED_BUDGET_S=270 + 20 s; 0 skips it: its first training step compiles the
# deeper pass, ~2-3 minutes at 28 layers), then the full bench_gpu.py run with what is left of 575 s;
# BENCH_ARGS="--smoke --device cpu" dry-runs it on a CPU; PROFILE=1 adds profile_gpu_train.py and profile_gpu_decode.py;
# SERVE=1 adds bench_serve.py on the static engine and on the eager one, 16 clients, its default model
# (the device tool's image has no fastapi, uvicorn or pydantic: carry their wheels, its README says how);
# those two run after both runs: give a smaller COMPILED_BUDGET_S and BENCH_BUDGET_S to leave them time)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, \
'| cuda', torch.version.cuda, torch.cuda.is_available())"
start=$SECONDS
# the files that mark tests `gpu` (not the whole suite: the GPU image lacks packages other tests import)
gpu_files=$(grep -l "mark\.gpu" tests/test_*.py)
timeout 170 python3 -m pytest -m gpu $gpu_files -q -p no:cacheprovider -rfEs 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
echo "pytest -m gpu: $((SECONDS - start)) s"
# First the compiled rows (compile_deep_passes, compile_decode_steps) beside their eager references:
# never measured on a GPU yet, and their first steps compile for minutes
COMPILED_BUDGET_S=${COMPILED_BUDGET_S:-270}
if [ "$COMPILED_BUDGET_S" -gt 0 ]; then
  start=$SECONDS
  timeout $((COMPILED_BUDGET_S + 20)) python3 benchmarks/bench_gpu.py --compiled --budget-s "$COMPILED_BUDGET_S" \
    --out "$OUT/bench_gpu_compiled.json" ${BENCH_ARGS:-} > "$OUT/bench_gpu_compiled.log" 2>&1
  echo "bench_gpu.py --compiled: exit $?, $((SECONDS - start)) s"
  grep -E "Error|error|SKIPPED|Traceback|warm-up|compile" "$OUT/bench_gpu_compiled.log" | head -20
  tail -c 5000 "$OUT/bench_gpu_compiled.log"
fi
# Then the full run (both tables, most important rows first) with what is left of 575 s
budget=${1:-$((575 - SECONDS - 20))}
echo "bench_gpu.py: budget $budget s"
if [ "$budget" -ge 60 ]; then
  start=$SECONDS
  timeout $((budget + 20)) python3 benchmarks/bench_gpu.py --budget-s "$budget" --out "$OUT/bench_gpu.json" ${BENCH_ARGS:-} \
    > "$OUT/bench_gpu.log" 2>&1
  echo "bench_gpu.py: exit $?, $((SECONDS - start)) s"
  grep -E "Error|error|SKIPPED|Traceback" "$OUT/bench_gpu.log" | head -20
  tail -c 7000 "$OUT/bench_gpu.log"
fi
if [ -n "${PROFILE:-}" ]; then  # where a stage-1 step's time goes (host vs device), after the bench
  smoke=""; [[ "${BENCH_ARGS:-}" == *--smoke* ]] && smoke="--smoke"  # a CPU dry run: the tiny shapes
  start=$SECONDS
  timeout 120 python3 benchmarks/profile_gpu_train.py $smoke --top 12 > "$OUT/profile_train.log" 2>&1
  echo "profile_gpu_train.py: exit $?, $((SECONDS - start)) s"
  grep -E "^== stage" "$OUT/profile_train.log"
  timeout 120 python3 benchmarks/profile_gpu_decode.py $smoke 2>&1 | tee "$OUT/profile_decode.log" | grep -v "^USDT" | tail -44
fi
if [ -n "${SERVE:-}" ]; then  # the server's running batch: static engine (CUDA graphs) vs eager, same load
  for engine in static eager; do
    start=$SECONDS
    timeout 150 python3 benchmarks/bench_serve.py --engine "$engine" --requests 1 --duration 60 ${SERVE_ARGS:-} \
      > "$OUT/bench_serve_$engine.log" 2>&1
    echo "bench_serve.py --engine $engine: exit $?, $((SECONDS - start)) s"
    tail -4 "$OUT/bench_serve_$engine.log"
  done
fi

#!/usr/bin/env bash
# The GPU checks in one command, for one H100/H200 on which SGLang is not installed (torch + Triton are):
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # writes OUT_DIR/summary.md (default gpu_check_out/), < 8 min
#   bash scripts/gpu_check.sh --self-test [OUT_DIR]   # CPU: the decode harness at toy size, checked
#
# Sections (each bounded by `timeout`, a failure is reported and the next section still runs):
#   1. kernel tests on the GPU (pytest tests/kernels with TRITON_INTERPRET=0; needs pytest);
#   2. the decode-attention benchmark (bench/decode_attention.py) at batch 32, 8K-32K;
#   3. the engine-free decode harness (bench/decode_harness.py): the sparrow backend's plan + landmark +
#      attention code on a Qwen3-8B-shaped stack (36 layers, batch 32, 8K-32K), dense vs qwen3-8b-0.86,
#      with and without CUDA graph capture;
#   4. DistillSparse's update vs the dense update (bench/distill_update.py): one Qwen3-8B layer at 32K tokens
#      under qwen3-8b-0.86, target: DistillSparse adds <= 60% to the dense update's time;
#   5. one trainer step of a Qwen3-1.7B-shaped policy (bench/trainer_step.py: random init, megatron-core
#      without Transformer Engine, full recompute) at 1024 + 32768 tokens: peak memory vs `sparrow plan`
#      (target within 15%) and tokens/s;
#   6. weight sync per rollout.weight_sync mode, trainer side (bench/weight_sync.py --gpu).
# Other issues add their sections below, each appending to the same summary. The whole script stays
# under 8 minutes: each section's limit is cut to what is left of TOTAL_S, and a section that would get
# under 20 s is skipped (reported).
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"

SELF_TEST=0
if [ "${1:-}" = "--self-test" ]; then
  SELF_TEST=1
  shift
fi
OUT="$(mkdir -p "${1:-gpu_check_out}" && cd "${1:-gpu_check_out}" && pwd)"
PY="${PYTHON:-python}"
if [ -x "$REPO/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then PY="$REPO/.venv/bin/python"; fi

# The kernels/ folder imports as `sparrow_kernels` (setup.py's package-dir mapping): without an install, a
# link in a scratch dir puts it on the path.
SHIM="$(mktemp -d)"
trap 'rm -rf "$SHIM"' EXIT
ln -s "$REPO/kernels" "$SHIM/sparrow_kernels"
export PYTHONPATH="$REPO:$SHIM${PYTHONPATH:+:$PYTHONPATH}"

SUMMARY="$OUT/summary.md"
{
  echo "# GPU check ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
  echo
  echo "- git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- $("$PY" -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}")' 2>&1)"
  echo "- device: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")' 2>&1)"
  echo
} >"$SUMMARY"

TOTAL_S=470
section() {  # section TITLE TIMEOUT_S CMD... : run, append status + output tail to the summary
  local title="$1" limit="$2"
  shift 2
  local left=$((TOTAL_S - SECONDS))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ] && [ "$SELF_TEST" = 0 ]; then
    printf '## %s: SKIPPED (the 8-minute budget is spent)\n\n' "$title" >>"$SUMMARY"
    return 0
  fi
  local log="$OUT/$(echo "$title" | tr -c 'a-zA-Z0-9\n' '_').log"
  local start=$SECONDS
  timeout "$limit" "$@" >"$log" 2>&1
  local rc=$?
  local status="ok"
  [ "$rc" -eq 124 ] && status="TIMED OUT after ${limit}s"
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && status="FAILED (exit $rc)"
  {
    echo "## $title: $status ($((SECONDS - start)) s)"
    echo
    echo '```'
    tail -n 25 "$log"
    echo '```'
    echo
  } >>"$SUMMARY"
  return 0
}

if [ "$SELF_TEST" = 1 ]; then
  export TRITON_INTERPRET=1
  TOTAL_S=100000  # the CPU self-test is not held to the GPU budget
  section "decode harness self-test (CPU, Triton interpreter)" 600 \
    "$PY" bench/decode_harness.py --self-test --out "$OUT/decode_harness"
  section "DistillSparse update self-test (CPU, Triton interpreter)" 600 \
    "$PY" bench/distill_update.py --self-test --out "$OUT/distill_update"
  section "trainer step self-test (CPU, tiny shape)" 600 \
    "$PY" bench/trainer_step.py --self-test --out "$OUT/trainer_step"
  cat "$SUMMARY"
  grep -q "self-test ok" "$OUT"/decode_harness_self_test*.log &&
    grep -q "distill self-test ok" "$OUT"/DistillSparse_update_self_test*.log &&
    grep -q "trainer step self-test ok" "$OUT"/trainer_step_self_test*.log
  exit $?
fi

export TRITON_INTERPRET=0
if "$PY" -c "import pytest" 2>/dev/null; then
  section "kernel tests on the GPU" 120 "$PY" -m pytest tests/kernels -q -x -p no:cacheprovider \
    --deselect tests/kernels/test_backend_graph.py
else
  echo "## kernel tests on the GPU: SKIPPED (pytest is not installed here)" >>"$SUMMARY"
  echo >>"$SUMMARY"
fi
section "decode-attention benchmark" 100 "$PY" bench/decode_attention.py --batch 32 --context 8192 16384 32768 \
  --budgets 1024 4096 --rep 30 --warmup 10 --out "$OUT/decode_attention.json" --markdown "$OUT/decode_attention.md"
[ -f "$OUT/decode_attention.md" ] && cat "$OUT/decode_attention.md" >>"$SUMMARY"
section "decode harness (Qwen3-8B stack, batch 32)" 240 "$PY" bench/decode_harness.py --steps 10 \
  --out "$OUT/decode_harness"
[ -f "$OUT/decode_harness.md" ] && cat "$OUT/decode_harness.md" >>"$SUMMARY"
section "DistillSparse update vs dense update (Qwen3-8B layer, 32K)" 90 "$PY" bench/distill_update.py \
  --tokens 32768 --schedule qwen3-8b-0.86 --out "$OUT/distill_update"
[ -f "$OUT/distill_update.md" ] && cat "$OUT/distill_update.md" >>"$SUMMARY"
section "trainer step (Qwen3-1.7B shape, 32K response, full recompute)" 150 "$PY" bench/trainer_step.py \
  --model qwen3-1.7b --prompt 1024 --response 32768 --out "$OUT/trainer_step"
[ -f "$OUT/trainer_step.md" ] && cat "$OUT/trainer_step.md" >>"$SUMMARY"

# ---- weight sync (issue 18) ------------------------------------------------------------------------
# The trainer side of each rollout.weight_sync mode on a Qwen3-1.7B-shaped random bf16 model on this
# GPU (no engines: SGLang is not installed here): http = device->host + pickle + base64 of one copy,
# disk = device->host + safetensors write, distributed = flattening each bucket on the GPU + a world-1
# NCCL broadcast. Bytes per sync and seconds per mode.
section "weight sync (Qwen3-1.7B shape, trainer side)" 90 "$PY" bench/weight_sync.py --gpu --repeats 1 \
  --bucket-mb 512 --out "$OUT/weight_sync"
[ -f "$OUT/weight_sync.md" ] && cat "$OUT/weight_sync.md" >>"$SUMMARY"
# ---- end weight sync --------------------------------------------------------------------------------

cat "$SUMMARY"

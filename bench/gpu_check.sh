#!/usr/bin/env bash
# The one prepared GPU check for issues 12 (FLUX.1 training) and 13 (SD3 / SD3.5), for a session lent a CUDA device
# machine.
#
#   device tool:  run(command="bash bench/gpu_check.sh", timeout_s=600)     (no carry needed)
#   anywhere:     OUT=/some/dir bash bench/gpu_check.sh
#
# What it does, in order, within GPU_CHECK_BUDGET_S seconds (default 510, under the tool's 600 s per command):
#   1. the machine: nvidia-smi, python, torch and CUDA versions (at the top of gpu_check.log);
#   2. the repo's CUDA tests: test files that branch on torch.cuda.is_available(), narrowed by -k "$GPU_TESTS_K"
#      (default "cuda or checkpointing": the host <-> device block-swap test and the checkpointing tests that run
#      on CUDA when it is there), with a 150 s limit (cuda_tests.log); GPU_TESTS_K="" skips them;
#   3. bench/flux_gpu.py: real-size FLUX.1 dev (random weights), LoRA rank 16, batch 1, bf16, gradient
#      checkpointing, over {1024, 512} px x {bf16, fp8 base} x {blocks_to_swap 0, 18}, most important first, each
#      configuration in its own process with its own limit, stopping GPU_CHECK_SD3_RESERVE_S (default 120) seconds
#      before the budget runs out so that SD3.5 medium keeps that time (the 1024 px configurations run first, the
#      512 px ones as time allows) (flux_gpu.jsonl, flux_gpu.md, flux_gpu.log); BENCH_CONFIGS=RES:BASE:SWAP,... replaces its list;
#   4. bench/sd3_gpu.py: real-size SD3.5 medium (random weights), LoRA rank 16, batch 1, bf16, gradient
#      checkpointing, over 1024 bf16, 1024 fp8 base, 512 bf16 (all without swapping; SD3_BENCH_CONFIGS replaces
#      the list), in the time left (sd3_gpu.jsonl, sd3_gpu.md, sd3_gpu.log).
# Both markdown tables are printed last. Everything lands in $OUT: the device tool brings back at most 8 files, and
# this writes exactly 8 (gpu_check.log, cuda_tests.log and the two benches' three each); the summary says so if
# there are more.
#
# Python: the device image's python3 already holds a CUDA torch (2.11+cu130 when last seen) and pytest; the repo's
# .venv is a CPU build for another Python and never travels. Nothing can be installed there (no network; CUDA
# torch wheels are far over the tool's 64 MiB carry limit), so this script only finds a Python whose torch sees a
# GPU and stops with a message if none does. The engine code it runs needs torch and numpy alone.
#
# GPU_CHECK_TINY=1 runs the same steps on a machine without a GPU (a Python whose torch imports; the bench with
# --tiny on the CPU): a test of this script, not a measurement.
#
# Time estimate on one H200 (not yet run): checks ~10 s, tests ~30-60 s, each FLUX 1024 px configuration ~40-60 s
# (start-up and random weights ~15-25 s, pinning ~10 GiB for swapping, 8 steps), each FLUX 512 px one ~25-35 s,
# each SD3.5 medium one ~15-30 s (2.2 B parameters, under a second a step): about 7-7.5 minutes in all.
# Per-configuration limits and the budget cut the rest if it runs slower (FLUX's 512 px configurations first).
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/test-output/gpu_check}"
mkdir -p "$OUT"
BUDGET_S="${GPU_CHECK_BUDGET_S:-510}"
SD3_RESERVE_S="${GPU_CHECK_SD3_RESERVE_S:-120}"
SD3_CONFIGS="${SD3_BENCH_CONFIGS:-1024:bf16:0,1024:fp8:0,512:bf16:0}"
GPU_TESTS_K="${GPU_TESTS_K-cuda or checkpointing}"
TINY="${GPU_CHECK_TINY:-0}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False

section() { printf '\n===== %s (t=%ss)\n' "$1" "$SECONDS"; }

main() {
section "machine"
PY=""
want='torch.cuda.is_available()'
[ "$TINY" = 1 ] && want='True'
for candidate in "${PYTHON:-}" python3 /opt/torch/.venv/bin/python3 .venv/bin/python; do
    [ -n "$candidate" ] || continue
    if "$candidate" -c "import sys, torch; sys.exit(0 if $want else 1)" >/dev/null 2>&1; then
        PY="$candidate"
        break
    fi
done
{
    date -u
    nvidia-smi || echo "nvidia-smi failed"
    echo "python with a CUDA torch: ${PY:-none} (GPU_CHECK_TINY=$TINY)"
    if [ -n "$PY" ]; then
        "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0),
          "memory GiB %.1f" % (torch.cuda.mem_get_info(0)[1] / 1024**3))
print("float8_e4m3fn", hasattr(torch, "float8_e4m3fn"))
EOF
    fi
} 2>&1
if [ -z "$PY" ]; then
    echo "gpu_check: no Python here imports a torch that sees a CUDA device (tried \$PYTHON, python3," \
         "/opt/torch/.venv/bin/python3, .venv/bin/python); nothing to measure" >&2
    exit 2
fi

section "CUDA tests"
tests_rc=skipped
if [ -n "$GPU_TESTS_K" ]; then
    mapfile -t test_files < <(grep -rl --include='test_*.py' --exclude-dir=browser 'cuda.is_available' tests || true)
    if [ "${#test_files[@]}" -gt 0 ]; then
        echo "files: ${test_files[*]}; -k '$GPU_TESTS_K'"
        tests_rc=0
        timeout --kill-after=10 150 "$PY" -m pytest -p no:cacheprovider -q -rs -k "$GPU_TESTS_K" "${test_files[@]}" \
            >"$OUT/cuda_tests.log" 2>&1 || tests_rc=$?
        tail -n 25 "$OUT/cuda_tests.log"
    else
        echo "no test file mentions cuda.is_available"
    fi
fi
echo "CUDA tests exit status: $tests_rc (124 = over the 150 s limit)"

section "FLUX.1 dev LoRA bench"
flux_rc=0
bench flux_gpu.py $(( BUDGET_S - SECONDS - 20 - SD3_RESERVE_S )) "${BENCH_CONFIGS:-}" || flux_rc=$?

section "SD3.5 medium LoRA bench"
sd3_rc=0
sd3_configs="$SD3_CONFIGS"
[ "$TINY" = 1 ] && sd3_configs="${SD3_BENCH_CONFIGS:-}"  # the plug-in's tiny list
bench sd3_gpu.py $(( BUDGET_S - SECONDS - 20 )) "$sd3_configs" || sd3_rc=$?

section "summary"
echo "CUDA tests: $tests_rc; FLUX bench: $flux_rc; SD3 bench: $sd3_rc (0 = every configuration ran or ran out of" \
     "memory); ${SECONDS}s"
for table in flux_gpu sd3_gpu; do
    if [ -f "$OUT/$table.md" ]; then echo; echo "$table:"; cat "$OUT/$table.md"; fi
done
files=$(find "$OUT" -type f | wc -l)
if [ "$files" -gt 8 ]; then echo "gpu_check: $files files in \$OUT; the device tool brings back only 8" >&2; fi
[ "$flux_rc" = 0 ] && [ "$sd3_rc" = 0 ]
}

# bench SCRIPT DEADLINE_S CONFIGS: one bench driver with its deadline; CONFIGS "" keeps the script's own list.
# The driver stops starting configurations at its deadline and gives each one min(its limit, time left); the outer
# timeout only guards against the driver itself hanging.
bench() {
    local script="$1" deadline="$2" configs="$3"
    if [ "$deadline" -lt 60 ]; then
        echo "not enough of the ${BUDGET_S} s budget left for bench/$script (${deadline} s)"
        return 3
    fi
    local args=(--out "$OUT" --deadline-s "$deadline")
    [ "$TINY" = 1 ] && args+=(--tiny)
    [ -n "$configs" ] && args+=(--configs "$configs")
    timeout --kill-after=10 $(( deadline + 30 )) "$PY" "bench/$script" "${args[@]}"
}

# One log of everything; the exit status is main's.
main 2>&1 | tee -a "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"

#!/usr/bin/env bash
# The one prepared GPU check for issue 12 (FLUX.1 training), for a session lent a CUDA device machine.
#
#   device tool:  run(command="bash bench/gpu_check.sh", timeout_s=600)     (no carry needed)
#   anywhere:     OUT=/some/dir bash bench/gpu_check.sh
#
# What it does, in order, within GPU_CHECK_BUDGET_S seconds (default 510, under the tool's 600 s per command):
#   1. the machine: nvidia-smi, python, torch and CUDA versions (env.txt);
#   2. the repo's CUDA tests: test files that branch on torch.cuda.is_available(), narrowed by -k "$GPU_TESTS_K"
#      (default "cuda or checkpointing": the host <-> device block-swap test and the checkpointing tests that run
#      on CUDA when it is there), with a 150 s limit (cuda_tests.log); GPU_TESTS_K="" skips them;
#   3. bench/flux_gpu.py: real-size FLUX.1 dev (random weights), LoRA rank 16, batch 1, bf16, gradient
#      checkpointing, over {1024, 512} px x {bf16, fp8 base} x {blocks_to_swap 0, 18}, most important first, each
#      configuration in its own process with its own limit, stopping before the budget runs out
#      (flux_gpu.jsonl, flux_gpu.md, flux_gpu.log); the markdown table is printed last.
# Everything lands in $OUT (the device tool brings back at most 8 files: this writes 6).
#
# Python: the device image's python3 already holds a CUDA torch (2.11+cu130 when last seen) and pytest; the repo's
# .venv is a CPU build for another Python and never travels. Nothing can be installed there (no network; CUDA
# torch wheels are far over the tool's 64 MiB carry limit), so this script only finds a Python whose torch sees a
# GPU and stops with a message if none does. The engine code it runs needs torch and numpy alone.
#
# GPU_CHECK_TINY=1 runs the same steps on a machine without a GPU (a Python whose torch imports; the bench with
# --tiny on the CPU): a test of this script, not a measurement.
#
# Time estimate on one H200 (not yet run): checks ~10 s, tests ~30-60 s, each 1024 px configuration ~40-60 s
# (start-up and random weights ~15-25 s, pinning ~10 GiB for swapping, 8 steps), each 512 px one ~25-35 s: about
# 6 minutes in all. Per-configuration limits and the budget cut the rest if it runs slower.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/test-output/gpu_check}"
mkdir -p "$OUT"
BUDGET_S="${GPU_CHECK_BUDGET_S:-510}"
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
} 2>&1 | tee "$OUT/env.txt"
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
deadline=$(( BUDGET_S - SECONDS - 20 ))
bench_rc=0
if [ "$deadline" -lt 60 ]; then
    echo "not enough of the ${BUDGET_S} s budget left for the bench (${deadline} s)"
    bench_rc=3
else
    # The driver stops starting configurations at its deadline and gives each one min(its limit, time left);
    # the outer timeout only guards against the driver itself hanging.
    args=(--out "$OUT" --deadline-s "$deadline")
    [ "$TINY" = 1 ] && args+=(--tiny)
    [ -n "${BENCH_CONFIGS:-}" ] && args+=(--configs "$BENCH_CONFIGS")
    timeout --kill-after=10 $(( deadline + 30 )) "$PY" bench/flux_gpu.py "${args[@]}" || bench_rc=$?
fi

section "summary"
echo "CUDA tests: $tests_rc; bench: $bench_rc (0 = every configuration ran or ran out of memory); ${SECONDS}s"
if [ -f "$OUT/flux_gpu.md" ]; then cat "$OUT/flux_gpu.md"; fi
[ "$bench_rc" = 0 ]
}

# One log of everything; the exit status is main's.
main 2>&1 | tee -a "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"

#!/usr/bin/env bash
# The one prepared GPU check (issues 12 FLUX.1, 13 SD3, 16 memory and mixed precision, 18 step throughput), for a
# session lent a CUDA device machine.
#
#   device tool:  run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
#   anywhere:     OUT=/some/dir bash bench/gpu_check.sh
#
# What it does, in order, within GPU_CHECK_BUDGET_S seconds (default 510, under the tool's 600 s per command):
#   1. the machine: nvidia-smi, python, torch and CUDA versions (at the top of gpu_check.log);
#   2. the packages the device image lacks, from .whl/ when it is there (the engine needs diffusers, pydantic,
#      tomli_w and imagesize; bitsandbytes for the 8-bit optimizers): tools/device_wheels.sh fills .whl here;
#   3. the repo's CUDA tests: tests/test_precision_paths.py (every mixed-precision path of training on CUDA: fp16
#      with its scaler, bf16, full_bf16 / full_fp16, fp8 base; LoRA, LoHa, TI, DreamBooth; SD1, SDXL, FLUX.1, SD3)
#      and the test files that branch on torch.cuda.is_available(), narrowed by -k "$GPU_TESTS_K" (default "cuda or
#      checkpointing"), with tests/test_step_sync.py and tests/test_cache_on_device.py (issue 18 on CUDA), within
#      GPU_TESTS_LIMIT_S seconds (default 200; cuda_tests.log); GPU_TESTS_K="" skips them;
#   4. bench/sd_gpu.py: real-size SD1.5 (512 px, batch 4 and 1, fp16 / bf16) and SDXL (1024 px, batch 1, bf16,
#      checkpointing) LoRA through the engine, with AdamW and AdamW8bit: it/s, peak VRAM and the step time over the
#      same step on pre-made tensors, until GPU_CHECK_FLOW_RESERVE_S (default 170) seconds are left
#      (SD_BENCH_CONFIGS=NAME,... replaces its list);
#   5. bench/flux_gpu.py: real-size FLUX.1 dev (random weights), LoRA rank 16, batch 1, bf16, gradient
#      checkpointing, over {1024, 512} px x {bf16, fp8 base} x {blocks_to_swap 0, 18}, most important first, each
#      configuration in its own process with its own limit, stopping GPU_CHECK_SD3_RESERVE_S (default 60) seconds
#      before the budget runs out so that SD3.5 medium keeps that time (BENCH_CONFIGS=RES:BASE:SWAP,... replaces
#      its list);
#   6. bench/sd3_gpu.py: real-size SD3.5 medium (random weights), LoRA rank 16, batch 1, bf16, gradient
#      checkpointing, over 1024 bf16, 1024 fp8 base, 512 bf16 (all without swapping; SD3_BENCH_CONFIGS replaces
#      the list), in the time left.
# The benches' markdown tables are printed last, and written as a bench/RESULTS.md section (results_section.md in
# the archive; GPU_CHECK_APPEND=1 appends it to bench/RESULTS.md, for a machine whose checkout stays). $OUT gets
# gpu_check.log, cuda_tests.log and bench.tar.gz (each bench's .jsonl, .md and .log; the device tool brings back at
# most 8 files), the archive also when a limit cuts the run short.
#
# Python: the device image's python3 already holds a CUDA torch (2.11+cu130 when last seen), transformers, peft,
# accelerate and pytest; the repo's .venv is a CPU build for another Python and never travels. Nothing can be
# downloaded there, so the few missing packages travel as wheels in .whl (carry it); this script finds a Python
# whose torch sees a GPU and stops with a message if none does.
#
# GPU_CHECK_TINY=1 runs the same steps on a machine without a GPU (a Python whose torch imports; the benches with
# --tiny on the CPU): a test of this script, not a measurement.
#
# Time estimate on one H200 (not yet run): checks ~10 s, wheels ~10 s, tests ~120-200 s (tiny models built first),
# SD1.5 / SDXL ~25-60 s a configuration (the random checkpoints written once per family), each FLUX 1024 px
# configuration ~40-60 s, each SD3.5 medium one ~15-30 s. The deadlines cut the rest (FLUX's 512 px ones first).
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/test-output/gpu_check}"
mkdir -p "$OUT"
BUDGET_S="${GPU_CHECK_BUDGET_S:-510}"
SD3_RESERVE_S="${GPU_CHECK_SD3_RESERVE_S:-60}"
FLOW_RESERVE_S="${GPU_CHECK_FLOW_RESERVE_S:-170}"
TESTS_LIMIT_S="${GPU_TESTS_LIMIT_S:-200}"
BENCH_OUT="${GPU_CHECK_BENCH_OUT:-/tmp/gpu_check_bench}"
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

section "packages"
if [ -d .whl ] && [ "$TINY" != 1 ]; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    if [ -d .whl/bnb_site ]; then export PYTHONPATH="$PWD/.whl/bnb_site${PYTHONPATH:+:$PYTHONPATH}"; fi
fi
"$PY" -c '
import importlib
for name in ("diffusers", "transformers", "accelerate", "peft", "pydantic", "bitsandbytes", "xformers"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as error:
        print(name, "not importable:", type(error).__name__, str(error)[:200])
' || true

section "CUDA tests"
tests_rc=skipped
if [ -n "$GPU_TESTS_K" ]; then
    mapfile -t test_files < <(grep -rl --include='test_*.py' --exclude-dir=browser 'cuda.is_available' tests || true)
    if [ "${#test_files[@]}" -gt 0 ]; then
        echo "files: ${test_files[*]}; -k '$GPU_TESTS_K'"
        tests_rc=0
        parallel=()
        if "$PY" -c "import xdist" 2>/dev/null && [ "$TINY" != 1 ]; then parallel=(-n 4 --dist load); fi
        timeout --kill-after=10 "$TESTS_LIMIT_S" "$PY" -m pytest -p no:cacheprovider -q -rs "${parallel[@]}" \
            tests/test_precision_paths.py tests/test_step_sync.py tests/test_cache_on_device.py \
            -k "$GPU_TESTS_K or precision or nothing_back or on_device" "${test_files[@]}" \
            >"$OUT/cuda_tests.log" 2>&1 || tests_rc=$?
        tail -n 25 "$OUT/cuda_tests.log"
    else
        echo "no test file mentions cuda.is_available"
    fi
fi
echo "CUDA tests exit status: $tests_rc (124 = over the ${TESTS_LIMIT_S} s limit)"

section "SD1.5 / SDXL LoRA bench"
sd_rc=0
bench sd_gpu.py $(( BUDGET_S - SECONDS - FLOW_RESERVE_S )) "${SD_BENCH_CONFIGS:-}" || sd_rc=$?

section "FLUX.1 dev LoRA bench"
flux_rc=0
bench flux_gpu.py $(( BUDGET_S - SECONDS - 20 - SD3_RESERVE_S )) "${BENCH_CONFIGS:-}" || flux_rc=$?

section "SD3.5 medium LoRA bench"
sd3_rc=0
sd3_configs="$SD3_CONFIGS"
[ "$TINY" = 1 ] && sd3_configs="${SD3_BENCH_CONFIGS:-}"  # the plug-in's tiny list
bench sd3_gpu.py $(( BUDGET_S - SECONDS - 20 )) "$sd3_configs" || sd3_rc=$?

section "summary"
echo "CUDA tests: $tests_rc; SD bench: $sd_rc; FLUX bench: $flux_rc; SD3 bench: $sd3_rc (0 = every configuration" \
     "ran or ran out of memory); ${SECONDS}s"
for table in sd_gpu flux_gpu sd3_gpu; do
    if [ -f "$BENCH_OUT/$table.md" ]; then echo; echo "$table:"; cat "$BENCH_OUT/$table.md"; fi
done
results_section > "$BENCH_OUT/results_section.md"
if [ "${GPU_CHECK_APPEND:-0}" = 1 ]; then  # a machine whose checkout stays (your own GPU box), not the device tool's
    cat "$BENCH_OUT/results_section.md" >> bench/RESULTS.md
    echo "appended the figures to bench/RESULTS.md"
fi
[ "$sd_rc" = 0 ] && [ "$flux_rc" = 0 ] && [ "$sd3_rc" = 0 ]
}

# The run's figures as a bench/RESULTS.md section: date, machine, command, CUDA tests' line, the benches' tables.
results_section() {
    local gpu
    gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')")
    printf '\n## bench/gpu_check.sh, %s, %s (torch %s)\n\n' "$(date -u +%Y-%m-%d)" "$gpu" \
        "$("$PY" -c 'import torch; print(torch.__version__)')"
    printf 'CUDA tests: %s\n' "$(grep -E '(passed|failed)' "$OUT/cuda_tests.log" 2>/dev/null | tail -n 1)"
    for table in sd_gpu flux_gpu sd3_gpu; do
        if [ -f "$BENCH_OUT/$table.md" ]; then printf '\n%s:\n\n' "$table"; cat "$BENCH_OUT/$table.md"; fi
    done
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
    local args=(--out "$BENCH_OUT" --deadline-s "$deadline")
    [ "$TINY" = 1 ] && args+=(--tiny)
    [ -n "$configs" ] && args+=(--configs "$configs")
    timeout --kill-after=10 $(( deadline + 30 )) "$PY" "bench/$script" "${args[@]}"
}

# Every bench file in one archive, also when a limit ends the run early (the device tool brings back 8 files).
pack() { if [ -d "$BENCH_OUT" ]; then tar czf "$OUT/bench.tar.gz" -C "$BENCH_OUT" . 2>/dev/null || true; fi; }
trap pack EXIT
mkdir -p "$BENCH_OUT"

# One log of everything; the exit status is main's.
main 2>&1 | tee -a "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"

#!/usr/bin/env bash
# Run Atelier's whole test suite, installing what it needs first (idempotent). Arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/bootstrap.sh" test
cd "$root"
# Tests never reach a model hub or phone home; the tiny models are built offline.
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False PYTHONDONTWRITEBYTECODE=1
# Two workers by default (ATELIER_TEST_WORKERS=0 runs in one process): much of the suite waits on engine
# subprocesses and the browser, so two halves overlap well on 2 cores. --dist loadfile keeps each file's tests,
# and so its module fixtures, on one worker. --no-loadscope-reorder keeps the collection's file order, longest
# first (tests/conftest.py), where xdist would start the files with the most tests first, whatever their length.
workers="${ATELIER_TEST_WORKERS:-2}"
parallel=()
if [ "$workers" != "0" ]; then
    parallel=(-n "$workers" --dist loadfile --no-loadscope-reorder)
    # One compute thread per process: two workers each running torch's default two threads on two cores spin
    # against each other (measured: a set of in-process training tests took 206 s this way and 40 s with one).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
fi
# The slowest tests are listed at the end, so a run (CI's too) shows where the suite's time goes.
exec "$root/.venv/bin/python" -m pytest -p no:cacheprovider --durations=25 "${parallel[@]}" "$@"

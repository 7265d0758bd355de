#!/usr/bin/env bash
# Run Atelier's whole test suite, installing what it needs first (idempotent). Arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/bootstrap.sh" test
cd "$root"
# Tests never reach a model hub or phone home; the tiny models are built offline.
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False PYTHONDONTWRITEBYTECODE=1
exec "$root/.venv/bin/python" -m pytest -p no:cacheprovider "$@"

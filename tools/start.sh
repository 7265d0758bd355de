#!/usr/bin/env bash
# Start Atelier's browser GUI, installing what it needs first (idempotent). Arguments go to app.py.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/bootstrap.sh" app
cd "$root"
exec "$root/.venv/bin/python" app.py "$@"

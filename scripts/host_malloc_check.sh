#!/usr/bin/env bash
# `spml bench` of an vs ignore on the synthetic model with glibc's default malloc and with the host-memory
# cache, on the CPU (default threads and 2 threads) and, where there is one, the GPU. Needs only torch, typer,
# rich and pyyaml.
#   OUT=/tmp/m bash scripts/host_malloc_check.sh
set -u
OUT=${OUT:-malloc-out}
STEPS=${STEPS:-40}
PY=${PYTHON:-python}
mkdir -p "$OUT"
run() {
  echo "\$ $PY -m pipeline.cli bench --methods an,ignore --steps $STEPS $*"
  timeout 120 $PY -m pipeline.cli bench --methods an,ignore --steps "$STEPS" "$@" 2>&1
}
{
  nproc; $PY -c "import torch, platform; print('torch', torch.__version__, platform.libc_ver())"
  for mode in system cache system cache; do run --device cpu --host-malloc "$mode"; done
  for mode in system cache; do run --device cpu --threads 2 --host-malloc "$mode"; done
  if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    for mode in system cache; do run --device cuda --host-malloc "$mode"; done
  fi
} 2>&1 | tee "$OUT/host_malloc.txt"

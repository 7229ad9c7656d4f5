#!/usr/bin/env bash
# `spml bench step` of an vs ignore on the synthetic model with glibc's default malloc (system), with the host-memory
# cache (cache) and, where installed (apt-get install libjemalloc2 libtcmalloc-minimal4), with jemalloc and tcmalloc
# preloaded, on the CPU (default threads and 2 threads) and, where there is one, the GPU. Needs only torch,
# typer, rich and pyyaml. ResNet-50 at 224 px instead: ARGS="--model resnet50 --image-size 224 --batch-size 8
# --weights none" STEPS=20.
#   OUT=/tmp/m bash scripts/host_malloc_check.sh
set -u
OUT=${OUT:-malloc-out}
STEPS=${STEPS:-40}
PY=${PYTHON:-python}
mkdir -p "$OUT"
ARGS=${ARGS:-}
TIMEOUT=${TIMEOUT:-120}
MODES=(system cache)
for lib in jemalloc tcmalloc; do
  if $PY -c "import sys; from pipeline.runtime.host import find_allocator as f; sys.exit(f('$lib') is None)"; then
    MODES+=("$lib")
  fi
done
malloc() {  # a mode as the bench header names it: the options that run it
  case $1 in
    system) echo --host-allocator glibc --no-host-malloc-cache ;;
    cache) echo --host-allocator glibc --host-malloc-cache ;;
    *) echo --host-allocator "$1" ;;
  esac
}
run() {
  echo "\$ $PY -m pipeline.cli bench step --method an --method ignore --steps $STEPS $ARGS $*"
  # shellcheck disable=SC2086  # ARGS: several options
  timeout "$TIMEOUT" $PY -m pipeline.cli bench step --method an --method ignore --steps "$STEPS" $ARGS "$@" 2>&1
}
{
  nproc; $PY -c "import torch, platform; print('torch', torch.__version__, platform.libc_ver())"
  # shellcheck disable=SC2046  # malloc: several options
  for round in 1 2; do for mode in "${MODES[@]}"; do run --device cpu $(malloc "$mode"); done; done
  # shellcheck disable=SC2046
  for mode in system cache; do run --device cpu --threads 2 $(malloc "$mode"); done
  if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    # shellcheck disable=SC2046
    for mode in system cache; do run --device cuda $(malloc "$mode"); done
  fi
} 2>&1 | tee "$OUT/host_malloc.txt"

#!/usr/bin/env bash
# `spml bench step` and `spml bench loader` on a GPU machine that has only torch/torchvision/numpy plus
# `pip install typer rich pyyaml` (python -m pipeline.cli bench needs no dvc, pycocotools, pyarrow, pandas or
# scikit-learn): AN and IGNORE (and Q2L's methods) at the paper's setting (448 px, batch 16), AMP off and on.
# Results go to $OUT (default ./bench-out).
#   OUT=/tmp/b bash scripts/gpu_bench.sh
# Tiny CPU dry run (RESNET_PARAMS, Q2L_PARAMS: KEY=VALUE words, each a --model-param; INPUT_WORKERS: worker counts):
#   SIZE=64 BATCH=2 STEPS=2 WARMUP=1 DEVICE=cpu RESNET_PARAMS='layers=[1,1,1,1] width_per_group=4' \
#   Q2L_PARAMS='layers=[1,1,1,1] width_per_group=4 hidden_dim=32 dim_feedforward=64' IMAGES=4 INPUT_WORKERS=1 \
#   bash scripts/gpu_bench.sh
set -u
OUT=${OUT:-bench-out}
SIZE=${SIZE:-448}
BATCH=${BATCH:-16}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
DEVICE=${DEVICE:-auto}
RESNET_PARAMS=${RESNET_PARAMS:-}
Q2L_PARAMS=${Q2L_PARAMS:-}
PER_RUN_TIMEOUT=${PER_RUN_TIMEOUT:-150}
IMAGES=${IMAGES:-256}             # COCO-like JPEGs of the real-format input bench
INPUT_WORKERS=${INPUT_WORKERS:-4 8}    # loader worker counts of the input bench, interleaved
mkdir -p "$OUT"
PY=${PYTHON:-python}

{
  echo "# $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', 'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())"
} 2>&1 | tee "$OUT/env.txt"

run() {  # name, then the command
  local name=$1; shift
  echo "\$ $*" | tee "$OUT/$name.txt"
  timeout "$PER_RUN_TIMEOUT" "$@" 2>&1 | tee -a "$OUT/$name.txt"
  echo "rc=${PIPESTATUS[0]}" | tee -a "$OUT/$name.txt"
}
bench() {  # name, the subcommand (step or loader), then its arguments
  local name=$1 mode=$2; shift 2
  run "$name" $PY -m pipeline.cli bench "$mode" --image-size "$SIZE" --batch-size "$BATCH" --steps "$STEPS" \
    --warmup "$WARMUP" --device "$DEVICE" "$@"
}

R=(--model resnet50 --method an --method ignore --weights none)
for kv in $RESNET_PARAMS; do R+=(--model-param "$kv"); done
Q=(--model q2l --method an --method ignore --method plc-lac --weights none)
for kv in $Q2L_PARAMS; do Q+=(--model-param "$kv"); done

bench resnet50-amp-off step "${R[@]}" --no-amp
bench resnet50-amp-on step "${R[@]}" --amp
bench resnet50-amp-on-cl step "${R[@]}" --amp --channels-last
bench q2l-amp-on step "${Q[@]}" --amp
bench q2l-amp-off step "${Q[@]}" --no-amp
bench resnet50-amp-on-cl-compile step "${R[@]}" --amp --channels-last --compile --warmup "$((WARMUP > 3 ? WARMUP : 3))"
# the input pipeline alone (images/s delivered to the device), the loader's views against the device's
for workers in 4 8; do
  for place in loader device; do
    bench "loader-$place-w$workers" loader --method ignore --num-workers "$workers" --augment-on "$place"
  done
done
# the input pipeline on real-format JPEGs (COCO-like, in COCO's layout): ours against an official-style loader,
# interleaved; views in the loader, views on the device, and decode on the device too (nvJPEG)
for mode in "loader cpu" "device cpu" "device device"; do
  read -r place decoder <<< "$mode"
  counts=(); for w in $INPUT_WORKERS; do counts+=(--worker-count "$w"); done
  run "input-$place-$decoder" $PY -m pipeline.cli bench input --image-size "$SIZE" --batch-size "$BATCH" \
    --device "$DEVICE" --method ignore --images "$IMAGES" "${counts[@]}" --rounds 3 --augment-on "$place" \
    --decode "$decoder"
done
echo done | tee "$OUT/done.txt"

#!/usr/bin/env bash
# `spml bench` on a GPU machine that has only torch/torchvision/numpy plus `pip install typer rich pyyaml`
# (python -m pipeline.cli bench needs no dvc, pycocotools, pyarrow, pandas or scikit-learn): AN and IGNORE (and
# Q2L's methods) at the paper's setting (448 px, batch 16), AMP off and on. Results go to $OUT (default ./bench-out).
#   OUT=/tmp/b bash scripts/gpu_bench.sh
# Tiny CPU dry run: SIZE=64 BATCH=2 STEPS=2 WARMUP=1 DEVICE=cpu RESNET_KW='{"layers":[1,1,1,1],"width_per_group":4}' \
#   Q2L_KW='{"layers":[1,1,1,1],"width_per_group":4,"hidden_dim":32,"dim_feedforward":64}' IMAGES=4 \
#   INPUT_WORKERS=1 bash scripts/gpu_bench.sh
set -u
OUT=${OUT:-bench-out}
SIZE=${SIZE:-448}
BATCH=${BATCH:-16}
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
DEVICE=${DEVICE:-auto}
RESNET_KW=${RESNET_KW:-}
Q2L_KW=${Q2L_KW:-}
PER_RUN_TIMEOUT=${PER_RUN_TIMEOUT:-150}
IMAGES=${IMAGES:-256}             # COCO-like JPEGs of the real-format input bench
INPUT_WORKERS=${INPUT_WORKERS:-4,8}
mkdir -p "$OUT"
PY=${PYTHON:-python}

{
  echo "# $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', 'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())"
} 2>&1 | tee "$OUT/env.txt"

bench() {  # name, then spml bench arguments
  local name=$1; shift
  local cmd=($PY -m pipeline.cli bench --image-size "$SIZE" --batch-size "$BATCH" --steps "$STEPS" --warmup "$WARMUP"
             --device "$DEVICE" --weights none "$@")
  echo "\$ ${cmd[*]}" | tee "$OUT/$name.txt"
  timeout "$PER_RUN_TIMEOUT" "${cmd[@]}" 2>&1 | tee -a "$OUT/$name.txt"
  echo "rc=${PIPESTATUS[0]}" | tee -a "$OUT/$name.txt"
}

R=(--model resnet50 --methods an,ignore)
[ -n "$RESNET_KW" ] && R+=(--model-kwargs "$RESNET_KW")
Q=(--model q2l --methods an,ignore,plc-lac)
[ -n "$Q2L_KW" ] && Q+=(--model-kwargs "$Q2L_KW")

bench resnet50-amp-off "${R[@]}" --no-amp
bench resnet50-amp-on "${R[@]}" --amp
bench resnet50-amp-on-cl "${R[@]}" --amp --channels-last
bench q2l-amp-on "${Q[@]}" --amp
bench q2l-amp-off "${Q[@]}" --no-amp
bench resnet50-amp-on-cl-compile "${R[@]}" --amp --channels-last --compile --warmup "$((WARMUP > 3 ? WARMUP : 3))"
# the input pipeline alone (images/s delivered to the device), the loader's views against the device's
for workers in 4 8; do
  for place in loader device; do
    bench "loader-$place-w$workers" --methods ignore --loader --workers "$workers" --augment-on "$place"
  done
done
# the input pipeline on real-format JPEGs (COCO-like, in COCO's layout): ours against an official-style loader,
# interleaved; views in the loader, views on the device, and decode on the device too (nvJPEG)
for mode in "loader cpu" "device cpu" "device device"; do
  read -r place decoder <<< "$mode"
  bench "input-$place-$decoder" --methods ignore --loader --dataset coco2014 --images "$IMAGES" \
    --worker-counts "$INPUT_WORKERS" --rounds 3 --augment-on "$place" --decode "$decoder"
done
echo done | tee "$OUT/done.txt"

#!/usr/bin/env bash
# Prepared for a lent GPU (issue 17), one call: where a meta-step's time goes for every
# algorithm at meta-batch 32 (5-way 1-shot Omniglot, 64 filters), iMAML with and without its
# inner loop compiled as CUDA graphs (--compile reduce-overhead), then every algorithm trained
# for the same BUDGET seconds of training and evaluated on the same 600 test episodes.
#
#   DATA=../shared/data/omniglot DEST=runs/gpu-time BUDGET=120 bash applications/imaml/gpu_time_protocol.sh
#
# DEVICE (cuda), BATCH (32), BUDGET (120 s of training per run), EVAL (600 test episodes).
# The runs go one after another (each has the GPU to itself); the phase tables are printed and
# written to DEST/phases-*/.  Smoke test on a CPU: DEVICE=cpu BATCH=2 BUDGET=3 EVAL=10 FILTERS=8.
set -u
DATA=${DATA:-../shared/data/omniglot}
DEST=${DEST:-runs/gpu-time}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-32}
BUDGET=${BUDGET:-120}
EVAL=${EVAL:-600}
FILTERS=${FILTERS:-64}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
mkdir -p "$DEST"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$DEST/gpu.txt"

for mode in off reduce-overhead; do
  python -m applications.imaml.phases --data-root "$DATA" --device "$DEVICE" --meta-batch "$BATCH" \
    --filters "$FILTERS" --threads 0 --rounds 7 --warmup 3 --algorithms imaml,maml,fomaml --compile "$mode" \
    --out "$DEST/phases-$mode" 2>&1 | tee "$DEST/phases-$mode.txt"
done

for run in "imaml|" "imaml-compiled|--compile reduce-overhead" "maml|--algorithm maml" "fomaml|--algorithm fomaml"; do
  IFS='|' read -r name flags <<< "$run"
  # shellcheck disable=SC2086
  python -m applications.imaml train --dataset omniglot --data-root "$DATA" --ways 5 --shots 1 --filters "$FILTERS" \
    --meta-batch "$BATCH" --meta-steps 1000000 --time-budget "$BUDGET" --eval-every 50 --val-episodes 100 \
    --evaluate --eval-episodes "$EVAL" --device "$DEVICE" --no-progress --out "$DEST/$name-s0" --overwrite $flags \
    > "$DEST/$name-s0.txt" 2>&1
  echo "$name: $(grep -o 'stopped after meta-step [0-9]*' "$DEST/$name-s0.txt") $(tail -n 1 "$DEST/$name-s0.txt")"
done
python -m applications.imaml plot "$DEST"/*-s0 --by-seed --out "$DEST/time_to_accuracy.png"

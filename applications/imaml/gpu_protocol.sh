#!/usr/bin/env bash
# The GPU protocol, prepared to run as ONE short call on a lent GPU machine (the device
# budget is minutes): meta-step timing per algorithm, then the Omniglot table (5-way and
# 20-way 1-shot; iMAML-GD, iMAML-HF, MAML, first-order MAML) trained under the same
# wall-clock budget per run, all runs at once, each evaluated on 600 test episodes.
#
#   DATA=path/to/omniglot DEST=runs/gpu bash applications/imaml/gpu_protocol.sh
#
# Environment: DATA (Omniglot root), DEST (output folder), DEVICE (cuda), TL (seconds of
# training per run, 85), EPISODES (600), JOBS (8), EXTRA (more train flags for every run).
set -u
DATA=${DATA:-../shared/data/omniglot}
DEST=${DEST:-runs/gpu}
DEVICE=${DEVICE:-cuda}
TL=${TL:-85}
EPISODES=${EPISODES:-600}
JOBS=${JOBS:-8}
EXTRA=${EXTRA:-}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
mkdir -p "$DEST"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  nproc
} > "$DEST/machine.txt" 2>&1

# 1. Seconds per meta-step and peak memory, one algorithm at a time (no contention).
timeout 40 python -m applications.imaml.timing --data-root "$DATA" --device "$DEVICE" --steps 3 --warmup 1 \
  --json "$DEST/timing_5w1s.json" $EXTRA > "$DEST/timing.txt" 2>&1
echo "timing exit $?" >> "$DEST/timing.txt"

# 2. The accuracy table: same meta-step cap and same wall-clock budget for every run.
# shellcheck disable=SC2086
timeout $((TL + 110)) python -m applications.imaml.compare --data-root "$DATA" --device "$DEVICE" \
  --settings 5:1,20:1 --algorithms imaml,imaml-hf,maml,fomaml --meta-steps 30000 --time-limit "$TL" \
  --episodes "$EPISODES" --jobs "$JOBS" --threads 1 --out "$DEST/table" -- --eval-batch 100 $EXTRA \
  > "$DEST/table.txt" 2>&1
echo "compare exit $?" >> "$DEST/table.txt"
tar czf "$DEST/runs.tgz" --exclude=checkpoint.pt -C "$DEST" table
cat "$DEST/machine.txt" "$DEST/timing.txt" "$DEST/table.txt"

#!/usr/bin/env bash
# The CPU protocol behind applications/imaml/README.md#results (issue 7): Omniglot 1-shot,
# 64 filters, meta-batch 8, Adam 1e-3, the same number of meta-steps for every algorithm,
# validation every 50 meta-steps on 100 fixed validation episodes (curves), the final
# meta-parameters evaluated on the same 600 fixed test episodes.  Two jobs at a time, one
# torch thread each (a 2-core machine).  Runs that already have metrics.json are skipped,
# and interrupted ones resume from their last checkpoint, so the script can be re-run.
#
#   DATA=../shared/data/omniglot DEST=runs/cpu-protocol bash applications/imaml/cpu_protocol.sh
#
# Environment: DATA, DEST, JOBS (2), STEPS5 (5-way meta-steps, 200), STEPS20 (20-way, 100),
# SEEDS ("0 1"), ONLY (a grep pattern over the job names, to run a subset).
set -u
DATA=${DATA:-../shared/data/omniglot}
DEST=${DEST:-runs/cpu-protocol}
JOBS=${JOBS:-2}
STEPS5=${STEPS5:-200}
STEPS20=${STEPS20:-100}
SEEDS=${SEEDS:-0 1}
ONLY=${ONLY:-.}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
mkdir -p "$DEST"

jobs() {  # name | ways | steps | flags
  for s in $SEEDS; do
    # 5-way 1-shot: the λ sweep of iMAML-GD (16 GD steps of 0.1, MINRES-5), the official recipe, baselines.
    for lam in 0.03 0.1 0.3; do echo "5w1s/imaml-lam$lam-s$s|5|$STEPS5|--algorithm imaml --lam $lam --seed $s"; done
    echo "5w1s/imaml-dev-s$s|5|$STEPS5|--algorithm imaml --recipe imaml-dev --lam 2 --seed $s"
    for alg in maml fomaml reptile imaml-hf; do echo "5w1s/$alg-s$s|5|$STEPS5|--algorithm $alg --seed $s"; done
  done
  for s in $SEEDS; do  # learned per-layer λ, started at the default λ = 0.1 (floor 0.01)
    echo "5w1s/imaml-learnlam-s$s|5|$STEPS5|--algorithm imaml --lam 0.1 --learn-lam --lam-min 0.01 --seed $s"
  done
  # the previous default (λ = 2 as a per-step proximal weight), one seed, for the record
  echo "5w1s/imaml-lam2-s0|5|$STEPS5|--algorithm imaml --lam 2 --seed 0"
  for s in $SEEDS; do
    echo "20w1s/imaml-lam0.1-s$s|20|$STEPS20|--algorithm imaml --lam 0.1 --inner-steps 16 --seed $s"
    for alg in maml fomaml reptile; do echo "20w1s/$alg-s$s|20|$STEPS20|--algorithm $alg --seed $s"; done
  done
}

run_one() {
  IFS='|' read -r name ways steps flags <<< "$1"
  out="$DEST/$name"
  [ -f "$out/metrics.json" ] && { echo "skip $name (done)"; return 0; }
  mkdir -p "$out"
  # An interrupted run continues from its last checkpoint (exactly, see README "Outputs").
  again="--overwrite"
  [ -f "$out/checkpoint.pt" ] && again="--resume"
  echo "$(date -u +%H:%M:%S) start $name ($again)"
  # shellcheck disable=SC2086
  python -m applications.imaml train --dataset omniglot --data-root "$DATA" --ways "$ways" --shots 1 \
    --filters 64 --meta-batch 8 --meta-steps "$steps" --eval-every 50 --val-episodes 100 \
    --checkpoint-every 50 --evaluate --eval-episodes 600 --threads 1 --device cpu --no-progress \
    --out "$out" $again $flags >> "$out/console.txt" 2>&1
  rc=$?
  echo "$(date -u +%H:%M:%S) exit $rc $name: $(tail -n 1 "$out/console.txt")"
}
export -f run_one
export DATA DEST
jobs | grep -E "$ONLY" | xargs -P "$JOBS" -I{} bash -c 'run_one "$@"' _ {}

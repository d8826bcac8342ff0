#!/usr/bin/env bash
# The CPU protocol behind docs/applications/imaml.md#results (issue 7): Omniglot 1-shot,
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
# The whole script is one block, read before it runs: editing the file while it runs is safe.
{
set -u
DATA=${DATA:-../shared/data/omniglot}
DEST=${DEST:-runs/cpu-protocol}
JOBS=${JOBS:-2}
STEPS5=${STEPS5:-200}
STEPS20=${STEPS20:-100}
SEEDS=${SEEDS:-0 1}
ONLY=${ONLY:-.}
# The inner budget these runs had (the defaults of 2026-11-27; issue 17 changed them).
OLD="--inner-steps 16 --inner-lr 0.1 --cg-steps 5 --query-batching vmap"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
mkdir -p "$DEST"

jobs() {  # name | ways | steps | eval-every | flags
  for s in $SEEDS; do
    # 5-way 1-shot: the λ sweep of iMAML-GD (16 GD steps of 0.1, MINRES-5), the official recipe, baselines.
    for lam in 0.03 0.1 0.3; do echo "5w1s/imaml-lam$lam-s$s|5|$STEPS5|50|--algorithm imaml --lam $lam --seed $s $OLD"; done
    echo "5w1s/imaml-dev-s$s|5|$STEPS5|50|--algorithm imaml --recipe imaml-dev --lam 2 --seed $s"
    for alg in maml fomaml reptile imaml-hf; do echo "5w1s/$alg-s$s|5|$STEPS5|50|--algorithm $alg --seed $s"; done
  done
  for s in $SEEDS; do  # learned per-layer λ, started at the default λ = 0.1 (floor 0.01)
    echo "5w1s/imaml-learnlam-s$s|5|$STEPS5|50|--algorithm imaml --lam 0.1 --learn-lam --lam-min 0.01 --seed $s $OLD"
  done
  # the previous default (λ = 2 as a per-step proximal weight), one seed, for the record
  echo "5w1s/imaml-lam2-s0|5|$STEPS5|50|--algorithm imaml --lam 2 --seed 0 $OLD"
  for s in $SEEDS; do
    echo "20w1s/imaml-lam0.1-s$s|20|$STEPS20|50|--algorithm imaml --lam 0.1 --seed $s $OLD"
    for alg in maml fomaml reptile; do echo "20w1s/$alg-s$s|20|$STEPS20|50|--algorithm $alg --seed $s"; done
  done
}

# shellcheck source=applications/imaml/protocol_lib.sh
source "$(dirname "$0")/protocol_lib.sh"
run_jobs
exit $?
}

#!/usr/bin/env bash
# The equal-time protocol behind docs/applications/imaml.md#time-to-accuracy (issue 17):
# Omniglot 1-shot, 64 filters, meta-batch 8, Adam 1e-3, every run trained for the SAME number
# of training seconds (--time-budget: log.csv's elapsed_seconds, validation excluded) or the
# same number of meta-steps, validation every EVAL meta-steps on 100 fixed validation episodes
# (the time-to-accuracy curves), the final meta-parameters evaluated on the same 600 fixed test
# episodes.  Two jobs at a time, one torch thread each (a 2-core machine).  Runs that already
# have metrics.json are skipped; interrupted ones resume from their last checkpoint.
#
#   SET=sweep5 DEST=runs/time-protocol bash applications/imaml/time_protocol.sh
#
# Environment: DATA, DEST, JOBS (2), SET (which job list: sweep5, sweep5c, long5, sweep20,
# final20), BUDGET (training seconds per run of the sweeps, 300), STEPS (meta-steps of long5,
# sweep20, final20), IMAML5 / IMAML20 (iMAML-GD's inner budget in long5 / final20),
# SEEDS ("0 1"), ONLY (a grep pattern over the job names).
# The whole script is one block, read before it runs: editing the file while it runs is safe.
{
set -u
DATA=${DATA:-../shared/data/omniglot}
DEST=${DEST:-runs/time-protocol}
JOBS=${JOBS:-2}
SET=${SET:-sweep5}
BUDGET=${BUDGET:-300}
STEPS=${STEPS:-2000}
IMAML5=${IMAML5:---inner-steps 3 --inner-lr 0.4 --cg-steps 2}  # as the committed long5 and sweep20 runs
IMAML20=${IMAML20:-$IMAML5}
SEEDS=${SEEDS:-0 1}
ONLY=${ONLY:-.}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
mkdir -p "$DEST"

jobs() {  # name | ways | meta-steps | eval-every | flags
  case "$SET" in
  sweep5)  # inner solvers at equal training time, 5-way 1-shot, λ = 0.1
    s=0
    big=1000000
    tb="--time-budget $BUDGET"
    echo "sweep5/gd16-m5-s$s|5|$big|25|$tb --algorithm imaml --inner-steps 16 --inner-lr 0.1 --cg-steps 5"
    echo "sweep5/gd5-lr0.1-m2-s$s|5|$big|25|$tb --algorithm imaml --inner-steps 5 --inner-lr 0.1 --cg-steps 2"
    echo "sweep5/gd5-lr0.3-m2-s$s|5|$big|25|$tb --algorithm imaml --inner-steps 5 --inner-lr 0.3 --cg-steps 2"
    echo "sweep5/nesterov5-m2-s$s|5|$big|25|$tb --algorithm imaml --inner-optimizer nesterov --inner-steps 5 --inner-lr 0.1 --cg-steps 2"
    echo "sweep5/nesterov4-m2-s$s|5|$big|25|$tb --algorithm imaml --inner-optimizer nesterov --inner-steps 4 --inner-lr 0.1 --cg-steps 2"
    echo "sweep5/nesterov8-m3-s$s|5|$big|25|$tb --algorithm imaml --inner-optimizer nesterov --inner-steps 8 --inner-lr 0.1 --cg-steps 3"
    echo "sweep5/momentum5-m2-s$s|5|$big|25|$tb --algorithm imaml --inner-optimizer momentum --inner-steps 5 --inner-lr 0.1 --cg-steps 2"
    echo "sweep5/adam5-m2-s$s|5|$big|25|$tb --algorithm imaml --inner-optimizer adam --inner-steps 5 --inner-lr 0.01 --cg-steps 2"
    # second round, around the best of the first (plain GD, fewer and larger steps, 2 Krylov steps)
    echo "sweep5/gd3-lr0.4-m2-s$s|5|$big|25|$tb --algorithm imaml --inner-steps 3 --inner-lr 0.4 --cg-steps 2"
    echo "sweep5/gd5-lr0.4-m2-s$s|5|$big|25|$tb --algorithm imaml --inner-steps 5 --inner-lr 0.4 --cg-steps 2"
    echo "sweep5/gd8-lr0.2-m2-s$s|5|$big|25|$tb --algorithm imaml --inner-steps 8 --inner-lr 0.2 --cg-steps 2"
    echo "sweep5/gd5-lr0.3-m1-s$s|5|$big|25|$tb --algorithm imaml --inner-steps 5 --inner-lr 0.3 --cg-steps 1"
    echo "sweep5/gd5-lr0.3-m3-s$s|5|$big|25|$tb --algorithm imaml --inner-steps 5 --inner-lr 0.3 --cg-steps 3"
    echo "sweep5/gd5-lr0.3-m2-lam0.3-s$s|5|$big|25|$tb --algorithm imaml --inner-steps 5 --inner-lr 0.3 --cg-steps 2 --lam 0.3"
    echo "sweep5/maml-s$s|5|$big|25|$tb --algorithm maml"
    echo "sweep5/fomaml-s$s|5|$big|25|$tb --algorithm fomaml"
    ;;
  sweep5c)  # third round: the cheapest budgets that kept the accuracy
    s=0
    big=1000000
    tb="--time-budget $BUDGET"
    echo "sweep5/gd3-lr0.4-m1-s$s|5|$big|25|$tb --algorithm imaml --inner-steps 3 --inner-lr 0.4 --cg-steps 1"
    echo "sweep5/gd2-lr0.5-m2-s$s|5|$big|25|$tb --algorithm imaml --inner-steps 2 --inner-lr 0.5 --cg-steps 2"
    echo "sweep5/gd3-lr0.4-m2-compiled-s$s|5|$big|25|$tb --algorithm imaml --inner-steps 3 --inner-lr 0.4 --cg-steps 2 --compile default"
    echo "sweep5/gd3-lr0.4-m2-lam0.03-s$s|5|$big|25|$tb --algorithm imaml --inner-steps 3 --inner-lr 0.4 --cg-steps 2 --lam 0.03"
    ;;
  long5)  # the three algorithms, STEPS meta-steps (>= 2000), two seeds, iMAML-GD at IMAML5
    for s in $SEEDS; do
      echo "long5/imaml-s$s|5|$STEPS|50|--algorithm imaml $IMAML5 --seed $s"
      echo "long5/maml-s$s|5|$STEPS|50|--algorithm maml --seed $s"
      echo "long5/fomaml-s$s|5|$STEPS|50|--algorithm fomaml --seed $s"
    done
    ;;
  sweep20)  # 20-way 1-shot, equal meta-steps (STEPS), seed 0: λ and the inner budget of iMAML-GD
    for lam in 0.03 0.1 0.3; do
      echo "sweep20/imaml-lam$lam-s0|20|$STEPS|25|--algorithm imaml $IMAML5 --lam $lam"
    done
    echo "sweep20/imaml-gd16-m5-lam0.1-s0|20|$STEPS|25|--algorithm imaml --inner-steps 16 --inner-lr 0.1 --cg-steps 5 --lam 0.1"
    echo "sweep20/imaml-gd8-lr0.2-m3-lam0.1-s0|20|$STEPS|25|--algorithm imaml --inner-steps 8 --inner-lr 0.2 --cg-steps 3 --lam 0.1"
    echo "sweep20/imaml-gd5-lr0.3-m2-lam0.1-s0|20|$STEPS|25|--algorithm imaml --inner-steps 5 --inner-lr 0.3 --cg-steps 2 --lam 0.1"
    echo "sweep20/imaml-gd5-lr0.3-m2-lam0.03-s0|20|$STEPS|25|--algorithm imaml --inner-steps 5 --inner-lr 0.3 --cg-steps 2 --lam 0.03"
    echo "sweep20/maml-s0|20|$STEPS|25|--algorithm maml"
    echo "sweep20/maml-lr0.1-s0|20|$STEPS|25|--algorithm maml --inner-lr 0.1"
    echo "sweep20/fomaml-s0|20|$STEPS|25|--algorithm fomaml"
    ;;
  final20)  # 20-way 1-shot, the three algorithms, STEPS meta-steps, two seeds, iMAML-GD at IMAML20
    for s in $SEEDS; do
      echo "final20/imaml-s$s|20|$STEPS|25|--algorithm imaml $IMAML20 --seed $s"
      echo "final20/maml-s$s|20|$STEPS|25|--algorithm maml --seed $s"
      echo "final20/fomaml-s$s|20|$STEPS|25|--algorithm fomaml --seed $s"
    done
    ;;
  *) echo "unknown SET=$SET (sweep5, sweep5c, long5, sweep20, final20)" >&2; exit 2 ;;
  esac
}

# shellcheck source=applications/imaml/protocol_lib.sh
source "$(dirname "$0")/protocol_lib.sh"
run_jobs
exit $?
}

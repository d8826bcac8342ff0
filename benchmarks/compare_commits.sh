#!/usr/bin/env bash
# Before/after timing of two commits, interleaved process by process:
#   bash benchmarks/compare_commits.sh OLD_COMMIT [ROUNDS=3] [OUT=runs/compare]
# Checks OLD_COMMIT out in a temporary git worktree, then runs, ROUNDS times in turn,
# small_problem.py and metastep.py (paper and app nets, 5w1s, bilevel / bilevel-loop /
# hand-written, 1 thread; peak memory of each in a fresh process) from the old tree and
# from this one, and prints the medians
# (benchmarks/compare_commits.py).  Each tree runs its own scripts on its own library.
{
set -euo pipefail
OLD=${1:?usage: compare_commits.sh OLD_COMMIT [ROUNDS] [OUT]}
ROUNDS=${2:-3}
OUT=${3:-runs/compare}
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
WT=$(mktemp -d /tmp/bilevel-old-XXXX)
git -C "$HERE" worktree add -f --detach "$WT" "$OLD" >/dev/null
trap 'git -C "$HERE" worktree remove --force "$WT"' EXIT
for i in $(seq 1 "$ROUNDS"); do
  for tree in before after; do
    dir=$WT; [ "$tree" = after ] && dir=$HERE
    (cd "$dir" && python benchmarks/small_problem.py --rounds 100 --warmup 10 --threads 1 --out "$OUT/sp_${tree}_$i" > "$OUT/sp_${tree}_$i.log" 2>&1)
    (cd "$dir" && python benchmarks/metastep.py --nets paper,app --settings 5w1s --methods bilevel,bilevel-loop,hand-written \
        --rounds 5 --mem-methods bilevel,bilevel-loop,hand-written --threads 1 --out "$OUT/ms_${tree}_$i" > "$OUT/ms_${tree}_$i.log" 2>&1)
    echo "$tree $i done $(date +%T)"
  done
done
python "$HERE/benchmarks/compare_commits.py" "$OUT"
exit
}

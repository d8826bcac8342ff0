# Shared by cpu_protocol.sh and time_protocol.sh (sourced, not run): run_one JOB trains and
# evaluates one protocol run, where JOB is "name|ways|meta-steps|eval-every|extra flags";
# run_jobs runs the caller's job list (its function `jobs`, filtered by ONLY), JOBS at a time.
# Omniglot 1-shot, 64 filters, meta-batch 8, Adam 1e-3, validation on 100 fixed episodes,
# the final meta-parameters evaluated on the same 600 fixed test episodes, one torch thread.
# A run with metrics.json is skipped; an interrupted one resumes from its last checkpoint.
run_one() {
  IFS='|' read -r name ways steps every flags <<< "$1"
  out="$DEST/$name"
  [ -f "$out/metrics.json" ] && { echo "skip $name (done)"; return 0; }
  mkdir -p "$out"
  again="--overwrite"
  [ -f "$out/checkpoint.pt" ] && again="--resume"
  echo "$(date -u +%H:%M:%S) start $name ($again)"
  # shellcheck disable=SC2086
  python -m applications.imaml train --dataset omniglot --data-root "$DATA" --ways "$ways" --shots 1 \
    --filters 64 --meta-batch 8 --meta-steps "$steps" --eval-every "$every" --val-episodes 100 \
    --checkpoint-every 50 --evaluate --eval-episodes 600 --threads 1 --device cpu --no-progress \
    --out "$out" $again $flags >> "$out/console.txt" 2>&1
  rc=$?
  echo "$(date -u +%H:%M:%S) exit $rc $name: $(tail -n 1 "$out/console.txt")"
}
export -f run_one

run_jobs() {  # non-zero if the job list fails (an unknown SET) or ONLY matches nothing
  export DATA DEST
  ( set -o pipefail; jobs | grep -E "$ONLY" | xargs -P "$JOBS" -I{} bash -c 'run_one "$@"' _ {} )
}

#!/usr/bin/env bash
# Every compression-aware method against the post-hoc baselines on Fashion-MNIST, with
# LeNet-300-100 and LeNet-5, on one schedule (compaware/conf/experiment/compare_fashion.yaml), then
# `compaware report` → docs/results.md, docs/results.csv, docs/pareto_*.png.
#
#   scripts/compare_fashion.sh            # or: make compare
#   OUT=outputs/cmp JOBS=2 DOCS=docs scripts/compare_fashion.sh
#   OUT=/tmp/cmp DOCS=/tmp/cmp/report EXTRA=debug=fast scripts/compare_fashion.sh  # a smoke run
#
# Per model (31 runs, 62 in all): one plain run (3 + 10 epochs, regularizer=none,
# compress=none) whose checkpoints every other run starts from, so all share the same start:
#   - methods, from its pretrain.pt: 10 regularized epochs, compress, 2 fine-tuning epochs;
#   - baselines, from its train.pt (the same 3 + 10 plain epochs): compress, 2 fine-tuning epochs.
# LeNet-300-100 reads all 60,000 training images, LeNet-5 the first 10,000 (LENET5_DATA).
# Runs go two at a time (JOBS), one thread each; a run that completed is skipped, so an
# interrupted comparison continues where it stopped. A run that fails is reported as failed
# and tried again by the next invocation.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/compare_fashion}
DOCS=${DOCS:-docs}
JOBS=${JOBS:-2}
COMPAWARE=${COMPAWARE:-compaware}
mkdir -p "$OUT"
start=$(date +%s)
completed() { (grep -ls '"status": "completed"' "$OUT"/*/*/results.json || true) | wc -l; }
done_before=$(completed)

run() {  # run <dir> <overrides...>: one training run, skipped when it already completed
  [ -n "${1:-}" ] || return 0  # never clear $OUT itself (an empty line from a killed producer)
  local dir=$OUT/$1; shift
  grep -qs '"status": "completed"' "$dir/results.json" && return 0
  rm -rf "$dir"  # a failed or interrupted attempt: start it again
  OMP_NUM_THREADS=1 $COMPAWARE train experiment=compare_fashion "$@" $EXTRA hydra.run.dir="$dir" \
    >"$dir.log" 2>&1 || echo "failed: $dir (see $dir.log)"
}
export -f run
EXTRA=${EXTRA:-}
LENET5_DATA=data.limit=10000  # LeNet-5's epoch costs 10× LeNet-300-100's on a CPU
export OUT COMPAWARE EXTRA

commands() {  # one line per run: <dir> <overrides...>
  local m=$1 pre="init_from=$OUT/$1/plain/checkpoints/pretrain.pt schedule.pretrain_epochs=0"
  local trained="init_from=$OUT/$1/plain/checkpoints/train.pt schedule.pretrain_epochs=0"
  trained="$trained schedule.epochs=0 regularizer=none"
  # Each method's strengths span its useful range (docs/strengths.md, docs/methods.md).
  for lam in 0.05 0.1 0.2 0.3; do
    echo "$m/lowrank_$lam model=$m $pre regularizer=lowrank regularizer.lam=$lam compress=svd" \
         "compress.target=null"
  done
  for lam in 0.05 0.1 0.2; do  # tau=0.95: the nuclear norm needs ~20× the SGL term's strength
    echo "$m/lowrank_sgl_$lam model=$m $pre regularizer=lowrank_sgl regularizer.lam=$lam" \
         "regularizer.tau=0.95 compress=prune+svd"
  done
  for lam in 0.002 0.005 0.01 0.02; do
    echo "$m/sgl_$lam model=$m $pre regularizer=sgl regularizer.lam=$lam compress=prune"
  done
  for lam in 0.5 1 2 4; do
    echo "$m/ssl_$lam model=$m $pre regularizer=ssl regularizer.lam=$lam compress=prune" \
         "schedule.finetune_mask=true"
  done
  for lam in 0.5 1 2; do  # the paper's optimiser (Adam, the tutorial's lr), at full strength
    echo "$m/sws_$lam model=$m $pre regularizer=sws regularizer.lam=$lam compress=quantize" \
         "schedule.optimizer=adam schedule.lr=5e-4 schedule.lr_schedule=constant" \
         "schedule.finetune_lr=5e-4 schedule.strength_ramp=0"
  done
  for energy in 0.6 0.8 0.95; do
    echo "$m/svd_$energy model=$m $trained compress=svd compress.target=null" \
         "compress.energy=$energy"
  done
  for q in 0.5 1 1.75; do
    echo "$m/magnitude_$q model=$m $trained compress=magnitude compress.q=$q"
  done
  for ratio in 0.3 0.6 0.8; do
    echo "$m/prune_$ratio model=$m $trained compress=prune compress.ratio=$ratio"
  done
  for bits in 2 3 5; do  # Adam, as Deep Compression's centroid update: a shared value's
    # gradient sums its members', which SGD at the common lr turns into a diverging step
    echo "$m/kmeans_$bits model=$m $trained compress=kmeans compress.linear_bits=$bits" \
         "compress.conv_bits=$bits schedule.optimizer=adam schedule.finetune_lr=1e-4"
  done
}

mkdir -p "$OUT/lenet5" "$OUT/lenet300"
printf '%s\n' "lenet5/plain model=lenet5 $LENET5_DATA" "lenet300/plain model=lenet300" \
  | sed 's/$/ regularizer=none compress=none/' \
  | xargs -P "$JOBS" -L 1 bash -c 'run "$@"' _
{ commands lenet5 | sed "s/\$/ $LENET5_DATA/"; commands lenet300; } | xargs -P "$JOBS" -L 1 bash -c 'run "$@"' _

wall=$(( $(date +%s) - start ))
done_now=$(completed)
$COMPAWARE report "$OUT" --out "$DOCS"
when=$(date -u '+%Y-%m-%d %H:%M UTC')
note="Written by \`scripts/compare_fashion.sh\` (\`make compare\`) on $when, $(nproc) CPU"
note="$note cores ($(uname -m)), $JOBS runs at a time with one thread each: wall time"
note="$note $((wall / 60)) min $((wall % 60)) s for $((done_now - done_before)) runs"
note="$note ($done_before were already done). Schedule: compaware/conf/experiment/compare_fashion.yaml."
awk -v note="$note" 'NR == 2 {print ""; print note} {print}' "$DOCS/results.md" \
  >"$DOCS/results.md.tmp" && mv "$DOCS/results.md.tmp" "$DOCS/results.md"

#!/bin/sh
# The evidence of configs/compare/magnetic-tile-synthetic-gpu.yaml on one GPU with 16 CPU cores: generate the three
# synthetic sets (CPU workers), pretrain the four ViT-Tiny + dpt-skip inits side by side on the GPU, then the
# compare matrix (its `parallel` cells at once on the GPU). Measured on one H200: ~3 minutes to the matrix, then
# an estimated 15-20 minutes for it (see the config). Each stage skips what is done, so an interrupted run
# continues with the same command (a cell cut mid-training resumes from its last checkpoint).
#   sh benchmarks/magnetic_tile_evidence_gpu.sh [path/to/magnetic-tile]
# Knobs (environment): SAMPLES (per synthetic set, 8000), PT_STEPS (1000), PT_BATCH (64), PT_SIZE (192),
# WORKERS (generate
# workers, 16), COMPARE_DEADLINE (epoch seconds by which the matrix's cells stop, then the seeds that finished are
# reported; unset: no limit), and any extra compare overrides as COMPARE_ARGS.
set -eu
DATA=${1:-../shared/datasets/magnetic-tile}
S=${SYNTHVIT:-synthvit}
SAMPLES=${SAMPLES:-8000}
PT_STEPS=${PT_STEPS:-1000}
PT_BATCH=${PT_BATCH:-64}
PT_SIZE=${PT_SIZE:-192}
WORKERS=${WORKERS:-16}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
stamp() { echo "[evidence $(date +%H:%M:%S)] $*"; }

stamp generate
gen() {  # config, then overrides
    cfg=$1; shift
    $S generate --config "$cfg" num_samples="$SAMPLES" num_workers="$WORKERS" "$@"
}
gen configs/generate/gray-256.yaml out_dir=shards/gpu-generic
gen configs/generate/contours-gray.yaml out_dir=shards/gpu-contours
gen configs/generate/tiles-domain.yaml out_dir=shards/gpu-domain procedural.backgrounds="$DATA"

stamp pretrain
pretrain() {  # name, then overrides of configs/pretrain/vit_tiny-dpt-gray.yaml
    name=$1; shift
    out=runs/pretrain-gpu-$name
    [ -f "$out/export/config.json" ] && return 0
    $S pretrain --config configs/pretrain/vit_tiny-dpt-gray.yaml out_dir="$out" steps="$PT_STEPS" \
        batch_size="$PT_BATCH" image_size="$PT_SIZE" precision=bf16 num_workers=3 save_every=500 log_every=100 "$@" \
        >"$out.log" 2>&1 || { tail -30 "$out.log"; return 1; }
}
mkdir -p runs
pretrain generic data=shards/gpu-generic & pids=$!
pretrain contours data=shards/gpu-contours & pids="$pids $!"
pretrain domain data=shards/gpu-domain & pids="$pids $!"
pretrain mix data=[shards/gpu-generic,shards/gpu-domain,shards/gpu-contours] data_weights=[0.3,0.5,0.2] &
pids="$pids $!"
fail=0
for pid in $pids; do wait "$pid" || fail=1; done
[ "$fail" = 0 ] || { stamp "a pretraining failed"; exit 1; }
for name in generic contours domain mix; do
    tail -n 1 "runs/pretrain-gpu-$name/metrics.jsonl" | sed "s/^/[$name] /"
done

stamp compare
CFG=configs/compare/magnetic-tile-synthetic-gpu.yaml
T=""
[ -z "${COMPARE_DEADLINE:-}" ] || T="timeout -s INT $((COMPARE_DEADLINE - $(date +%s)))"
# shellcheck disable=SC2086
if ! $T $S compare --config "$CFG" data="$DATA" ${COMPARE_ARGS:-}; then
    # cut short (COMPARE_DEADLINE): report the seeds whose cells all finished (compare plans seeds in order)
    seeds=""
    for k in 0 1 2; do
        n=$(ls runs/compare-magnetic-tile-synthetic-gpu/cells/*/n*/s$k/metrics.json 2>/dev/null | wc -l)
        [ "$n" -ge "${CELLS_PER_SEED:-12}" ] || break
        seeds="${seeds:+$seeds,}$k"
    done
    stamp "compare cut short: reporting seeds [$seeds]"
    [ -n "$seeds" ] || exit 1
    # shellcheck disable=SC2086
    $S compare --config "$CFG" data="$DATA" ${COMPARE_ARGS:-} seeds="[$seeds]"
fi
stamp done

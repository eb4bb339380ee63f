#!/bin/sh
# The evidence of configs/compare/magnetic-tile-synthetic.yaml, end to end on a CPU (about 6-7 hours on 2 cores:
# generation ~1 min, four pretrainings ~11 min each, the compare matrix the rest). Every step skips what is done
# (finished shards, a pretrain export, finished compare cells): re-run the same command after an interruption.
#   sh benchmarks/magnetic_tile_evidence.sh [path/to/magnetic-tile]
set -eu
DATA=${1:-../shared/datasets/magnetic-tile}
export HF_HUB_OFFLINE=1
S=${SYNTHVIT:-synthvit}
$S generate --config configs/generate/gray-256.yaml
$S generate --config configs/generate/contours-gray.yaml
$S generate --config configs/generate/tiles-domain.yaml procedural.backgrounds="$DATA"
pretrain() {  # name, then overrides of configs/pretrain/vit_tiny-dpt-gray.yaml (600 steps x 32, cls+seg)
    name=$1; shift
    [ -f "runs/pretrain-vit_tiny-dpt-$name/export/config.json" ] ||
        $S pretrain --config configs/pretrain/vit_tiny-dpt-gray.yaml out_dir="runs/pretrain-vit_tiny-dpt-$name" "$@"
}
pretrain gray
pretrain contours data=shards/contours-gray
pretrain domain data=shards/tiles-domain
pretrain mix600 data=[shards/gray-256,shards/tiles-domain,shards/contours-gray] data_weights=[0.3,0.5,0.2]
$S compare --config configs/compare/magnetic-tile-synthetic.yaml data="$DATA"

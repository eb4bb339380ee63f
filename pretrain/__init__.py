"""Stage 2: ViT pretraining on synthvit shards (to come)."""

"""Stage 2: pretrain a timm model (ViT, conv-stem hybrid or CNN; :mod:`models`) on synthvit shards with CutMix,
through Accelerate. Reads the shard contract (:mod:`generate.schema`), writes checkpoints and the export
(:mod:`synthvit.models.export`) that ``finetune init=...`` starts from."""

"""Stage 3: fine-tune a ViT, hybrid or CNN baseline (:mod:`models`) on a few hundred real high-resolution images,
with tiled full-resolution inference and metrics (``synthvit finetune``, ``evaluate``, ``predict``). Reads a
pretrain export; writes a run folder whose contract is :mod:`finetune.artifacts`."""

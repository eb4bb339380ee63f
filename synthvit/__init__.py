"""synthvit: pretrain Vision Transformers on synthetic defect imagery, fine-tune on few real high-res images.

The four stages are the top-level packages ``generate``, ``pretrain``, ``finetune`` and ``compare``; ``models``
holds the networks every stage shares. This package is the ground floor: the CLI, the config loader, small shared
I/O (:mod:`synthvit.io`) and the training utilities of both loops (:mod:`synthvit.training`, which needs torch).
Importing ``synthvit`` itself imports nothing heavy.
"""
__version__ = "0.1.0"

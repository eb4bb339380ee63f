"""synthvit: pretrain Vision Transformers on synthetic defect imagery, fine-tune on few real high-res images.

Stages are the top-level packages ``generate``, ``pretrain`` and ``finetune``; this package holds the CLI,
the config loader and small shared I/O. It imports nothing heavy.
"""
__version__ = "0.1.0"

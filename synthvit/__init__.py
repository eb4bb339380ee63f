"""synthvit: pretrain Vision Transformers on synthetic defect imagery, fine-tune on few real high-res images.

The stages are the top-level packages ``generate``, ``pretrain`` and ``finetune``, and ``synthvit.compare`` on top.
This package is the ground floor: the CLI, the config loader, small shared I/O (:mod:`synthvit.io`), object storage
(:mod:`synthvit.storage`) and the training utilities of the loops (:mod:`synthvit.training`, which needs torch);
its two rooms one floor up serve every stage: the real-data reader (:mod:`synthvit.data`) and the networks
(:mod:`synthvit.models`). Importing ``synthvit`` itself imports nothing heavy.
"""
__version__ = "0.2.0"

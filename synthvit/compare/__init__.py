"""Stage 4: ``synthvit compare``: an experiment matrix (models x real-data budgets), each cell a ``synthvit finetune``
run read back through :mod:`finetune.artifacts`, and a report a person can look at."""

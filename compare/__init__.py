"""``synthvit compare``: an experiment matrix (models x real-data budgets) and a report a person can look at."""

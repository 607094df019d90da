"""The DVC stages (prepare, validate, train, evaluate) and what only they use; `python -m pipelines.<stage>`."""

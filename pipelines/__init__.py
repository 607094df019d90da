"""The DVC stages (prepare, validate, train, evaluate) and their helpers; `python -m pipelines.<stage>`."""

"""Prefect flows and deployments: thin wrappers over the same step functions as the CLI."""

"""Inference code and the serving stack: pyfunc model, model-server supervisor, gateway, inference log."""

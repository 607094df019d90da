"""The drift monitor: reference set, windows of the inference log, decision, feedback folded into data."""

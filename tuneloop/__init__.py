"""tuneloop core: typed settings, project paths, shared I/O and the command line (never imported here)."""

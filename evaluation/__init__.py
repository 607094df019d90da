"""Quality, calibration, bias, behavioural tests, drift statistics and gates: pure functions, no I/O."""

"""Registry operations: register a candidate, compare it with prod, promote, roll back, audit, reproduce."""

"""Fast CPU backends: numba loops over sequences, one module per metric family."""

"""retrv.kernels."""

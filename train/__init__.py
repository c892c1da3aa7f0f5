"""retrv.train."""

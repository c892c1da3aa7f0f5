"""retrv.export."""

"""retrv.calibration."""

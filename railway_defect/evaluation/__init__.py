"""Metrics with confidence intervals, the operating threshold, and calibration."""

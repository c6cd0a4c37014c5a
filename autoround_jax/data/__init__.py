"""Text sources: offline evaluation and calibration text."""

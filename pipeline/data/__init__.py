"""Real evaluation and calibration data that ships inside installed packages."""

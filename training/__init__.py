"""Network definitions and the training recipes of the CXR-LT 2026 papers."""

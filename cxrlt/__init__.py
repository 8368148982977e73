"""cxrlt-triton: CXR-LT 2026 chest X-ray findings served by Triton Inference Server."""

__version__ = "0.1.0"

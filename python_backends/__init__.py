"""Logic that runs inside Triton's Python backend, importable and testable without Triton.

Each `triton_models/<model>/model.py` is a thin adapter: it reads its config, builds one
of the objects here and converts between Triton tensors and numpy.
"""

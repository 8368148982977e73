"""PyTorch (timm, open_clip) -> ONNX with parity checks, the text-embedding cache and the repository builder."""

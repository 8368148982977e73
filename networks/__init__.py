"""Network definitions (timm, open_clip), their checkpoints and weight loading."""

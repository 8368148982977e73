"""The training recipes of the CXR-LT 2026 papers: data, losses, samplers, the job registry and the loop."""

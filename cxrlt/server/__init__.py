"""The server layer: launching the tritonserver of the nvidia-pytriton wheel (the `serve` extra)."""

from cxrlt.server.launcher import Endpoints, ServerError, TritonServer, free_port

__all__ = ["Endpoints", "ServerError", "TritonServer", "free_port"]

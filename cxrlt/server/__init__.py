"""The server layer: launching the tritonserver of the nvidia-pytriton wheel (the `serve` extra),
keeping it healthy (the stub watchdog, orphaned shared-memory regions) and its admin calls."""

from cxrlt.server.launcher import Endpoints, ServerError, Tls, TritonServer, free_port, is_loopback

__all__ = ["Endpoints", "ServerError", "Tls", "TritonServer", "free_port", "is_loopback"]

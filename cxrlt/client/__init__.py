"""The client layer: the gRPC SDK integrators import (`from cxrlt.client import CxrltClient`)
and the system shared-memory regions it can send images through. Needs the `client` extra."""

from cxrlt.client.sdk import (
    REPOSITORY_PARAMETER,
    Repository,
    backoff_delay,
    repository_identity,
    DEFAULT_URL,
    MODEL_LABELS,
    AsyncCxrltClient,
    ClientError,
    CxrltClient,
    ModelInfo,
    RequestTimeout,
    ServerFailed,
    ServerOverloaded,
    ServerRejected,
    ServerUnavailable,
)

__all__ = [
    "REPOSITORY_PARAMETER",
    "Repository",
    "backoff_delay",
    "repository_identity",
    "DEFAULT_URL",
    "MODEL_LABELS",
    "AsyncCxrltClient",
    "ClientError",
    "CxrltClient",
    "ModelInfo",
    "RequestTimeout",
    "ServerFailed",
    "ServerOverloaded",
    "ServerRejected",
    "ServerUnavailable",
]

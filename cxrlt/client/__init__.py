"""The client layer: the gRPC SDK integrators import (`from cxrlt.client import CxrltClient`)
and the system shared-memory regions it can send images through. Needs the `client` extra."""

from cxrlt.client.sdk import *  # noqa: F401,F403
from cxrlt.client.sdk import __all__  # noqa: F401

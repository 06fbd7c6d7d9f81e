"""A Python client for the Stratix streaming gateway, shaped like the Stratix SDK.

It depends only on httpx and httpx-sse and never imports the `gateway` server package.
"""

from gateway_client.auth import TokenSource
from gateway_client.backoff import Backoff
from gateway_client.client import GatewayClient
from gateway_client.errors import (
    AuthError,
    GatewayClientError,
    GatewayResponseError,
    ProtocolError,
    RetriesExhausted,
    StreamClosed,
)
from gateway_client.events import ContinuityLost, Event
from gateway_client.stream import EventStream

__all__ = [
    "AuthError",
    "Backoff",
    "ContinuityLost",
    "Event",
    "EventStream",
    "GatewayClient",
    "GatewayClientError",
    "GatewayResponseError",
    "ProtocolError",
    "RetriesExhausted",
    "StreamClosed",
    "TokenSource",
]

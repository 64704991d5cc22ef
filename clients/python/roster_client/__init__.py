"""Roster's Python client: publish instances of services and subscribe to their publishers.

```python
import roster_client

async with await roster_client.Client.connect() as client:      # ./.roster/client.toml
    pub = await client.publish("web", [b"10.0.0.1:8080"], attributes={"zone": "eu-1"})
    sub = await client.subscribe("web")
    async for snapshot in sub:
        print(snapshot.version, [p.data for p in snapshot.publishers])
```
"""

from .client import (
    CLOSED,
    CONNECTED,
    CONNECTING,
    RECONNECTING,
    Client,
    ClientStats,
    Publication,
    Subscription,
)
from .config import ClientConfig
from .errors import (
    BadFrame,
    ClusterMismatch,
    ConfigError,
    ConnectionLost,
    FrameTooLarge,
    HelloRequired,
    Internal,
    InvalidArgument,
    LimitExceeded,
    NoQuorum,
    NotFound,
    NotLeader,
    Overloaded,
    PermissionDenied,
    RosterError,
    ShuttingDown,
    SlotMoving,
    Timeout,
    Unauthenticated,
    Unavailable,
    UnexpectedMessage,
    UnknownMember,
    UnsupportedVersion,
)
from .model import PERSISTENT_CLIENT_ID, Event, Health, Publisher, Publishers, Snapshot, diff

__all__ = [
    "CLOSED",
    "CONNECTED",
    "CONNECTING",
    "PERSISTENT_CLIENT_ID",
    "RECONNECTING",
    "BadFrame",
    "Client",
    "ClientConfig",
    "ClientStats",
    "ClusterMismatch",
    "ConfigError",
    "ConnectionLost",
    "Event",
    "FrameTooLarge",
    "Health",
    "HelloRequired",
    "Internal",
    "InvalidArgument",
    "LimitExceeded",
    "NoQuorum",
    "NotFound",
    "NotLeader",
    "Overloaded",
    "PermissionDenied",
    "Publication",
    "Publisher",
    "Publishers",
    "RosterError",
    "ShuttingDown",
    "SlotMoving",
    "Snapshot",
    "Subscription",
    "Timeout",
    "Unauthenticated",
    "Unavailable",
    "UnexpectedMessage",
    "UnknownMember",
    "UnsupportedVersion",
    "diff",
]

"""The only package that imports ``nats``: connect, request/reply, KV, the events stream.

NATS errors are mapped to :mod:`torchloom.errors` here, so no other package
needs to know nats-py's exception types.
"""

from torchloom.transport.advisories import Disconnect, follow_disconnects
from torchloom.transport.connection import Connection, Message, connect
from torchloom.transport.credentials import Credentials, credentials_from_env, load_credentials
from torchloom.transport.jetstream import (
    History,
    KeyValue,
    ensure_jetstream,
    ensure_lease_bucket,
)

__all__ = [
    "Connection",
    "Credentials",
    "Disconnect",
    "History",
    "KeyValue",
    "Message",
    "connect",
    "credentials_from_env",
    "ensure_jetstream",
    "ensure_lease_bucket",
    "follow_disconnects",
    "load_credentials",
]

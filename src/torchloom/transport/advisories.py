"""The NATS servers' own advisories: a client's connection closed.

nats-server publishes ``$SYS.ACCOUNT.<account>.DISCONNECT`` in its system account the moment a
client's connection ends, on every server of a cluster, with the client's id and the server's
(`NATS system events <https://docs.nats.io/running-a-nats-service/configuration/sys_accounts>`_).
A process that dies — ``kill -9``, a segfault, an OOM kill — closes its TCP connection at
once, so this is how its death is seen in milliseconds; a host whose link is cut closes
nothing, which is what heartbeats remain for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from torchloom.transport.connection import Connection, Message

DISCONNECTS = "$SYS.ACCOUNT.*.DISCONNECT"
"""The subject of every account's disconnect advisories (needs a system-account user)."""


class _Server(msgspec.Struct):
    id: str = ""


class _Client(msgspec.Struct):
    id: int = 0
    name: str = ""


class _Advisory(msgspec.Struct):
    server: _Server = msgspec.field(default_factory=_Server)
    client: _Client = msgspec.field(default_factory=_Client)
    reason: str = ""


_decoder = msgspec.json.Decoder(_Advisory)


@dataclass(frozen=True, slots=True)
class Disconnect:
    """One closed client connection.

    Attributes:
        conn: ``<server id>/<client id>``, as :attr:`Connection.identity` names it.
        name: the connection's name (a Threadlet's is ``threadlet-<job>-<replica>-<rank>``).
        reason: nats-server's words: ``Client Closed`` (the client's end went away),
            ``Stale Connection``, ``Slow Consumer``, ``Server Shutdown``, …
    """

    conn: str
    name: str
    reason: str


def parse_disconnect(data: bytes) -> Disconnect | None:
    """The :class:`Disconnect` in a ``DISCONNECT`` advisory's payload; None if it is not one."""
    try:
        adv = _decoder.decode(data)
    except msgspec.DecodeError:
        return None
    if not adv.server.id or not adv.client.id:
        return None
    return Disconnect(f"{adv.server.id}/{adv.client.id}", adv.client.name, adv.reason)


async def follow_disconnects(conn: Connection, handler: Callable[[Disconnect], None]) -> None:
    """Call ``handler`` for every client connection that closes on the cluster (``conn`` must
    be signed in to the system account). ``handler`` runs in the read loop: it must return in
    microseconds, without I/O."""

    def _on(msg: Message) -> None:
        found = parse_disconnect(msg.data)
        if found is not None:
            handler(found)

    await conn.subscribe_inline(DISCONNECTS, _on)

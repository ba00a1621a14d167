"""Credentials of one NATS client: who it is (an nkey), how it checks the server (TLS).

A credentials file (``*.creds.json``, mode 0600) is what ``torchloom up --secure`` hands
each role: the Weaver, the operator (CLI, scripts) and each job's Threadlets. It holds
the role's nkey seed (NATS' ed25519 identities: the server keeps only the public key),
the CA that signed the server's certificate (None: the system's trust store), and the
inbox prefix the role's permissions allow replies on.

Where a client finds it: an explicit path, else ``$TORCHLOOM_CREDS``, else (for the
operator on the machine of ``torchloom up``) the state dir's endpoint.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Literal

import msgspec

from torchloom.errors import TorchloomError

ENV_CREDS = "TORCHLOOM_CREDS"
Role = Literal["weaver", "operator", "job", "system"]


class Credentials(msgspec.Struct, kw_only=True, frozen=True):
    """One client's identity and trust.

    Attributes:
        role: ``weaver`` (everything), ``operator`` (control and history), ``job``
            (one job's telemetry, events, join and config) or ``system`` (the server's system
            account: its connect and disconnect advisories, read by the Weaver).
        nkey_seed: the nkey seed (``SU…``); secret.
        job_id: for the ``job`` role: the job these credentials serve.
        ca_pem: PEM of the CA that signed the server's certificate; None: system trust.
        inbox_prefix: the prefix of this client's reply subjects (its permissions allow
            replies there and nowhere else).
    """

    role: Role
    nkey_seed: str
    job_id: str | None = None
    ca_pem: str | None = None
    inbox_prefix: str = "_INBOX"
    tls: bool = True
    """Whether the server speaks TLS (False: an nkey over plain TCP on loopback)."""

    def tls_context(self) -> ssl.SSLContext:
        """A client TLS context that trusts ``ca_pem`` (or the system's CAs)."""
        return ssl.create_default_context(cadata=self.ca_pem)

    def save(self, path: Path) -> Path:
        """Write these credentials to ``path`` (mode 0600); returns it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(self)))
        return path


def load_credentials(path: Path) -> Credentials:
    """Read a credentials file.

    Raises:
        TorchloomError: missing, unreadable, or not a credentials file.
    """
    try:
        return msgspec.json.decode(Path(path).read_bytes(), type=Credentials)
    except OSError as exc:
        raise TorchloomError(f"cannot read credentials {path}: {exc.strerror}") from None
    except msgspec.DecodeError as exc:
        raise TorchloomError(f"{path} is not a torchloom credentials file: {exc}") from None


def credentials_from_env() -> Credentials | None:
    """The credentials named by ``$TORCHLOOM_CREDS``, or None when it is unset.

    Raises:
        TorchloomError: it names a file that is not a credentials file.
    """
    path = os.environ.get(ENV_CREDS)
    return load_credentials(Path(path)) if path else None

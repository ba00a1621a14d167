"""``torchloom up --secure``: credentials per role, TLS, and the NATS server's permissions.

Everything lives in ``<state dir>/secure`` (mode 0700; secrets 0600):

* ``ca.pem`` / ``ca-key.pem``: a CA made for this installation (unless the user brings
  certificates), which signs ``server.pem`` / ``server-key.pem`` — the certificate of both
  NATS and the dashboard, for ``localhost``, the host's names and addresses, and any
  ``extra_hosts``;
* ``weaver.creds.json``, ``operator.creds.json``, ``jobs/<job>.creds.json``: an nkey per
  role (:mod:`torchloom.transport.credentials`); the server knows only their public keys;
* ``nats.conf``: the server's TLS and users with their permissions (:func:`permissions`);
* ``dashboard.token``: the dashboard's bearer token when none was given.

Roles and what NATS lets them do (anything else is refused by the server itself):

=========  ==========================================================================
weaver     publish and subscribe everything (it serves all jobs)
operator   the control entry point of every job (``loom.*.control``) and JetStream's API
           (history, config reads); replies on its own inbox
job J      publish ``loom.J.telemetry.>``, ``loom.J.events.>`` and ``loom.J.join``; read
           job J's desired config (its KV subject and a direct get of its key);
           replies on ``_INBOX_J.>`` only
=========  ==========================================================================

There is no anonymous user: a client without credentials is refused. New jobs get
credentials with :meth:`SecureDir.issue_job` (``torchloom creds job J``), which rewrites
``nats.conf`` and has the running server reload it (``SIGHUP``).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import secrets
import signal
import socket
from pathlib import Path

import nkeys

from torchloom.errors import TorchloomError
from torchloom.paths import read_endpoint
from torchloom.protocol import names
from torchloom.transport.credentials import ENV_CREDS, Credentials, Role, load_credentials

SECURE_DIR = "secure"


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def new_nkey_seed() -> str:
    """A fresh user nkey seed (``SU…``), from 32 random bytes (ed25519)."""
    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed.decode()


def public_key(seed: str) -> str:
    """The public key (``U…``) of an nkey seed."""
    key: bytes = nkeys.from_seed(seed.encode()).public_key
    return key.decode()


def job_inbox(job_id: str) -> str:
    return f"_INBOX_{job_id}"


def permissions(role: Role, job_id: str | None = None) -> dict[str, dict[str, list[str]]]:
    """The NATS permissions of a role: ``{"publish": {"allow": [...]}, "subscribe": …}``.

    Raises:
        ValueError: the ``job`` role without a job id.
    """
    if role == "weaver":
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    if role == "operator":
        return {
            "publish": {"allow": [names.ALL_CONTROL, "$JS.API.>"]},
            "subscribe": {"allow": ["_INBOX.>"]},
        }
    if not job_id:
        raise ValueError("the job role needs a job id")
    bucket_stream = f"KV_{names.CONFIG_BUCKET}"
    return {
        "publish": {
            "allow": [
                f"{names.PREFIX}.{job_id}.telemetry.>",
                f"{names.PREFIX}.{job_id}.events.>",
                names.join_subject(job_id),
                f"$JS.API.STREAM.INFO.{bucket_stream}",
                f"$JS.API.DIRECT.GET.{bucket_stream}.{names.config_watch_subject(job_id)}",
            ]
        },
        "subscribe": {"allow": [names.config_watch_subject(job_id), f"{job_inbox(job_id)}.>"]},
    }


def _conf_value(value: object) -> str:
    """A value in nats-server's config syntax (JSON-like; strings always quoted)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_conf_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_conf_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class SecureDir:
    """The secure material of one state dir.

    Args:
        state_dir: the state dir of ``torchloom up``.
        tls_cert: the user's certificate (PEM) for NATS and the dashboard; None: generate.
        tls_key: its private key (PEM).
        tls_ca: the CA clients check ``tls_cert`` against; None with a user certificate:
            the system's trust store.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_ca: Path | None = None,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise TorchloomError("give both --tls-cert and --tls-key, or neither")
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / SECURE_DIR
        self.user_cert = tls_cert
        self.user_key = tls_key
        self.user_ca = tls_ca

    # ---- files ----------------------------------------------------------------------

    @property
    def cert_file(self) -> Path:
        return self.user_cert or self.dir / "server.pem"

    @property
    def key_file(self) -> Path:
        return self.user_key or self.dir / "server-key.pem"

    @property
    def conf_file(self) -> Path:
        return self.dir / "nats.conf"

    def creds_file(self, role: Role, job_id: str | None = None) -> Path:
        return (
            self.dir / "jobs" / f"{job_id}.creds.json"
            if role == "job"
            else self.dir / f"{role}.creds.json"
        )

    def ca_pem(self) -> str | None:
        if self.user_cert is not None:
            return self.user_ca.read_text() if self.user_ca else None
        return (self.dir / "ca.pem").read_text()

    # ---- set-up ---------------------------------------------------------------------

    def ensure(self, *, extra_hosts: tuple[str, ...] = ()) -> None:
        """Create what is missing: the CA and server certificate (unless the user's), the
        weaver and operator credentials, and ``nats.conf``. Idempotent: existing keys and
        credentials are kept, so clients holding them still get in after a restart.

        Raises:
            TorchloomError: a user certificate or key cannot be read.
        """
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        if self.user_cert is None:
            if not (self.dir / "server.pem").exists():
                self._make_certificates(extra_hosts)
        else:
            for path in (self.user_cert, self.user_key):
                if path is None or not path.is_file():
                    raise TorchloomError(f"TLS file {path} does not exist")
        for role in ("weaver", "operator"):
            self._ensure_creds(role)
        self.write_conf()

    def _ensure_creds(self, role: Role, job_id: str | None = None) -> Credentials:
        path = self.creds_file(role, job_id)
        if path.exists():
            return load_credentials(path)
        creds = Credentials(
            role=role,
            nkey_seed=new_nkey_seed(),
            job_id=job_id,
            ca_pem=self.ca_pem(),
            inbox_prefix=job_inbox(job_id) if role == "job" and job_id else "_INBOX",
        )
        creds.save(path)
        return creds

    def credentials(self, role: Role, job_id: str | None = None) -> Credentials:
        """The stored credentials of a role.

        Raises:
            TorchloomError: there are none (not set up, or the job has none yet).
        """
        return load_credentials(self.creds_file(role, job_id))

    def issue_job(self, job_id: str) -> Path:
        """Credentials for job ``job_id``'s Threadlets (created once, then reused); the
        server's config is rewritten and the running embedded server (its pid from the
        state dir's endpoint) reloads it. Returns the file.

        Raises:
            InvalidRequestError: ``job_id`` is not a valid job id.
        """
        names.check_id("job id", job_id)
        self.dir.joinpath("jobs").mkdir(exist_ok=True, mode=0o700)
        existed = self.creds_file("job", job_id).exists()
        self._ensure_creds("job", job_id)
        if not existed:
            self.write_conf()
            endpoint = read_endpoint(self.state_dir) or {}
            pids = endpoint.get("nats_pids") or [endpoint.get("nats_pid")]
            for pid in pids:  # every server of an embedded cluster
                if isinstance(pid, int):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGHUP)  # nats-server reloads its config
        return self.creds_file("job", job_id)

    def dashboard_token(self) -> str:
        """The dashboard's generated bearer token (made once, then reused)."""
        path = self.dir / "dashboard.token"
        if not path.exists():
            _write_secret(path, secrets.token_urlsafe(24).encode())
        return path.read_text().strip()

    def write_conf(self) -> None:
        """Write ``nats.conf``: TLS, and one nkey user per credentials file with its role's
        permissions. Listen address, port and JetStream come from the command line."""
        users = []
        files = [self.creds_file("weaver"), self.creds_file("operator")]
        files += sorted((self.dir / "jobs").glob("*.creds.json"))
        for path in files:
            if not path.exists():
                continue
            creds = load_credentials(path)
            users.append(
                {
                    "nkey": public_key(creds.nkey_seed),
                    "permissions": permissions(creds.role, creds.job_id),
                }
            )
        text = (
            "# written by torchloom (secure.py); rewritten when a job gets credentials\n"
            f"tls {_conf_value({'cert_file': self.cert_file, 'key_file': self.key_file})}\n"
            f"authorization {{ users: {_conf_value(users)} }}\n"
            "max_payload: 1048576\n"
        )
        tmp = self.conf_file.with_suffix(".tmp")
        _write_secret(tmp, text.encode())
        tmp.replace(self.conf_file)

    def _make_certificates(self, extra_hosts: tuple[str, ...]) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "torchloom local CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        key = ec.generate_private_key(ec.SECP256R1())
        dns, ips = _host_names(extra_hosts)
        alt = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ip) for ip in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=825))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        pem = serialization.Encoding.PEM
        no_pw = serialization.NoEncryption()
        pkcs8 = serialization.PrivateFormat.PKCS8
        _write_secret(self.dir / "ca-key.pem", ca_key.private_bytes(pem, pkcs8, no_pw))
        (self.dir / "ca.pem").write_bytes(ca.public_bytes(pem))
        _write_secret(self.dir / "server-key.pem", key.private_bytes(pem, pkcs8, no_pw))
        (self.dir / "server.pem").write_bytes(cert.public_bytes(pem))


def job_env(state_dir: Path, job_id: str | None) -> dict[str, str]:
    """Environment for a job's training processes started beside a secure ``torchloom up``
    (same state dir): ``$TORCHLOOM_CREDS`` naming the job's credentials (issued if new).
    Empty when that ``up`` is not secure, or ``$TORCHLOOM_CREDS`` is set already.

    Raises:
        TorchloomError: the up is secure but no job id is known.
    """
    endpoint = read_endpoint(state_dir) or {}
    if not endpoint.get("secure") or os.environ.get(ENV_CREDS):
        return {}
    if not job_id:
        raise TorchloomError("a secure torchloom needs the job id (--job) to issue credentials")
    return {ENV_CREDS: str(SecureDir(state_dir).issue_job(job_id))}


def _host_names(
    extra: tuple[str, ...],
) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """DNS names and addresses the generated certificate covers: loopback, this host's
    names and addresses, and ``extra`` (names or addresses)."""
    host = socket.gethostname()
    dns = ["localhost", host, socket.getfqdn()]
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    candidates = list(extra)
    try:
        candidates += [str(info[4][0]) for info in socket.getaddrinfo(host, None)]
    except OSError:
        pass
    for item in candidates:
        if not item or item in ("0.0.0.0", "::"):
            continue
        try:
            ip = ipaddress.ip_address(item.split("%")[0])
        except ValueError:
            dns.append(item)
            continue
        ips.append(ip)
    return list(dict.fromkeys(dns)), list(dict.fromkeys(ips))

"""The control plane on this machine: the embedded NATS server, the torchft lighthouse, the
Weaver and the dashboard, held under a state-dir lock.

:class:`StackConfig` says what to run (nested parts: :class:`NatsConfig`,
:class:`LighthouseConfig`, :class:`DashboardConfig`, :class:`SecurityConfig`) and
:meth:`StackConfig.build` makes the :class:`Stack` that runs it — ``torchloom up`` in the
foreground, ``torchloom demo`` beside the training job, benches and tests. Only one stack may
hold a state dir: a second one gets :class:`~torchloom.errors.AlreadyRunningError` naming the
first.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from torchloom._proc import set_nice
from torchloom.errors import (
    AlreadyRunningError,
    InvalidRequestError,
    NotReachableError,
    PortInUseError,
    TorchloomError,
)
from torchloom.lighthouse import Lighthouse
from torchloom.lighthouse import available as lighthouse_available
from torchloom.nats_server import NatsCluster, NatsServer
from torchloom.paths import (
    DEFAULT_UI_PORT,
    ENDPOINT_FILE,
    LOCK_FILE,
    is_loopback,
    read_endpoint,
    write_endpoint,
)
from torchloom.secure import SecureDir, new_nkey_seed, public_key
from torchloom.transport import Credentials, credentials_from_env, load_credentials
from torchloom.weaver import ControlSettings, LivenessConfig, Weaver
from torchloom.weaver.policies import PolicyEngine
from torchloom.weaver.recorder import EventSink
from torchloom.weaver.state import Retention

if TYPE_CHECKING:
    from torchloom.weaver.web import Dashboard


@dataclass(frozen=True, slots=True, kw_only=True)
class NatsConfig:
    """Where the control plane's NATS is.

    Attributes:
        url: an existing NATS server/cluster; None starts the embedded one.
        port: port of the embedded server; None picks a free one.
        host: interface the embedded server binds (loopback by default).
        cluster: how many embedded servers, joined into one JetStream cluster (1: a single
            server). With 3 the loss of any one server stops nothing.
        replicas: copies of torchloom's streams and buckets; None: min(3, servers).
    """

    url: str | None = None
    port: int | None = None
    host: str = "127.0.0.1"
    cluster: int = 1
    replicas: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LighthouseConfig:
    """The torchft lighthouse replica groups form their quorum with.

    Attributes:
        url: ``"auto"`` starts the embedded lighthouse when torchft is installed; a URL uses
            an existing one; None starts none.
        heartbeat_timeout_ms: the embedded lighthouse's heartbeat timeout, in ms.
    """

    url: str | None = "auto"
    heartbeat_timeout_ms: int = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class DashboardConfig:
    """The dashboard, HTTP API and ``/metrics`` (:mod:`torchloom.weaver.web`).

    Attributes:
        port: TCP port (0 picks a free one).
        port_fallback: when ``port`` is taken, serve on a free port instead of failing.
        host: interface it binds (loopback by default).
        token: bearer token for the page and API; required off loopback (made for the state
            dir when the stack is secure).
        samplers: job id → the playground's sampler for it (``FILE.py:FUNC``,
            :mod:`torchloom.playground`); imports go to ``<state dir>/imports``.
    """

    port: int = DEFAULT_UI_PORT
    port_fallback: bool = False
    host: str = "127.0.0.1"
    token: str | None = None
    samplers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class SecurityConfig:
    """Credentials per role, TLS and permissions (:mod:`torchloom.secure`) on the embedded NATS,
    and HTTPS with a token on the dashboard.

    Attributes:
        secure: on or off; None: on exactly when NATS or the dashboard binds beyond loopback.
            With an external NATS (``NatsConfig.url``) the Weaver signs in with
            ``$TORCHLOOM_CREDS`` instead.
        tls_cert: the user's certificate (PEM) for NATS and the dashboard; None: made for the
            state dir.
        tls_key: its private key (PEM); None: made for the state dir.
        tls_ca: the CA (PEM) that signed it; None: made for the state dir.
    """

    secure: bool | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StackConfig:
    """Everything a :class:`Stack` runs, in nested parts; :meth:`build` makes the stack.

    Attributes:
        state_dir: holds the lock, ``endpoint.json``, the JetStream storage and credentials.
        nats: where NATS is (:class:`NatsConfig`).
        lighthouse: the torchft lighthouse (:class:`LighthouseConfig`).
        security: TLS, credentials and permissions (:class:`SecurityConfig`).
        dashboard: None serves no dashboard.
        liveness: failure, suspect and hang timeouts of the Weaver (None: its defaults).
        retention: how long and how many gone ranks the DR map keeps (None: 1 h, 1,000).
        control: the Weaver's control settings (lead time, …; None: its defaults).
        policy_file: TOML settings of the policies (they win over settings stored by an
            earlier run); None: the stored settings, else the defaults.
        ingest_workers: processes that take the ranks' telemetry in for the Weaver (a NATS
            queue group), so its intake is not bound to one core; 0: its own loop does.
        watch_connections: mark a rank failed the moment its NATS connection closes (the
            embedded servers' disconnect advisories, read by the Weaver as a system-account
            user); False: heartbeats only. Not available with an external NATS.
        nice: the nice value of the control plane — the Weaver's thread and the embedded
            NATS — where permitted (:func:`torchloom._proc.set_nice`); None: unchanged. A
            negative one makes the scheduler wake them before CPU-bound training processes on
            the same cores (they use little CPU: it costs training nothing).
    """

    state_dir: Path
    nats: NatsConfig = field(default_factory=NatsConfig)
    lighthouse: LighthouseConfig = field(default_factory=LighthouseConfig)
    dashboard: DashboardConfig | None = None
    security: SecurityConfig = field(default_factory=SecurityConfig)
    liveness: LivenessConfig | None = None
    retention: Retention | None = None
    control: ControlSettings | None = None
    policy_file: Path | None = None
    watch_connections: bool = True
    ingest_workers: int = 0
    nice: int | None = None

    def build(self, *, on_event: EventSink | None = None) -> Stack:
        """The stack this config describes, not started (:meth:`Stack.start`).

        Raises:
            PolicyError: ``policy_file`` is not valid (before anything starts).
        """
        return Stack(self, on_event=on_event)


class Stack:
    """NATS (embedded unless ``config.nats.url`` is given), the lighthouse, the Weaver and the
    dashboard, the Weaver and dashboard on a background thread.

    Args:
        config: what to run.
        on_event: called with each history event the Weaver records (on the Weaver's loop:
            it must not block).
    """

    def __init__(self, config: StackConfig, *, on_event: EventSink | None = None) -> None:
        self.config = config
        self.nice = config.nice
        self.nice_applied: bool | None = None
        """Whether ``nice`` took effect on the Weaver's thread (None: not asked, or not yet)."""
        ui = config.dashboard
        secure = config.security.secure
        if secure is None:
            secure = not (is_loopback(config.nats.host) and (ui is None or is_loopback(ui.host)))
        self.state_dir = Path(config.state_dir).expanduser()
        self.secure_dir = (
            SecureDir(
                self.state_dir,
                tls_cert=config.security.tls_cert,
                tls_key=config.security.tls_key,
                tls_ca=config.security.tls_ca,
            )
            if secure and config.nats.url is None
            else None
        )
        if config.nats.cluster > 1 and not (
            config.nats.url is None and is_loopback(config.nats.host)
        ):
            raise InvalidRequestError(
                "--cluster starts a cluster on this machine's loopback, for trying it (its routes "
                "are not secured); on several hosts run a NATS cluster and pass --nats-url"
            )
        # a bad policy file is an error before anything starts
        self.policies = PolicyEngine.from_file(config.policy_file) if config.policy_file else None
        self.on_event = on_event
        self.lighthouse: Lighthouse | None = None
        self.lighthouse_url = ""
        self.nats: NatsServer | None = None
        """The embedded server (the first of the cluster's with ``NatsConfig.cluster`` > 1)."""
        self.cluster: NatsCluster | None = None
        self.nats_url = ""
        self.weaver: Weaver | None = None
        self.ui_token = ui.token if ui else None
        self.dashboard: Dashboard | None = None
        self._lock: IO[str] | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    def _acquire(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        lock = open(self.state_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held for the stack's life
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            ep = read_endpoint(self.state_dir) or {}
            raise AlreadyRunningError(
                str(self.state_dir), ep.get("pid"), ep.get("nats_url")
            ) from None
        self._lock = lock

    def start(self, *, timeout_s: float = 20.0) -> None:
        """Take the lock, start NATS and the Weaver, write ``endpoint.json``; wait until ready.

        Raises:
            AlreadyRunningError: another ``torchloom up`` holds this state dir.
            TorchloomError: NATS or the Weaver did not come up within ``timeout_s``.
        """
        self._acquire()
        cfg, ui = self.config, self.config.dashboard
        try:
            creds = system = None
            if cfg.nats.url:
                self.nats_url = cfg.nats.url
                creds = credentials_from_env()
            else:
                conf = None
                if self.secure_dir is not None:
                    self.secure_dir.ensure(extra_hosts=(cfg.nats.host, *([ui.host] if ui else [])))
                    conf = self.secure_dir.conf_file
                    creds = self.secure_dir.credentials("weaver")
                    self.ui_token = self.ui_token or self.secure_dir.dashboard_token()
                system = self._system_credentials()
                system_key = public_key(system.nkey_seed)
                if cfg.nats.cluster > 1:
                    self.cluster = NatsCluster(
                        store_dir=self.state_dir / "nats-cluster",
                        size=cfg.nats.cluster,
                        host=cfg.nats.host,
                        config_file=conf,
                        system_key=system_key,
                        nice=self.nice,
                        ports=(
                            [cfg.nats.port + i for i in range(cfg.nats.cluster)]
                            if cfg.nats.port
                            else None
                        ),
                    )
                    self.nats_url = self.cluster.start()
                    self.nats = self.cluster.servers[0]
                else:
                    self.nats = NatsServer(
                        store_dir=self.state_dir / "nats",
                        port=cfg.nats.port,
                        host=cfg.nats.host,
                        config_file=conf,
                        nice=self.nice,
                        system_key=system_key,
                    )
                    self.nats_url = self.nats.start()
            if cfg.lighthouse.url == "auto":
                if lighthouse_available():
                    self.lighthouse = Lighthouse(
                        log_file=self.state_dir / "lighthouse.log",
                        heartbeat_timeout_ms=cfg.lighthouse.heartbeat_timeout_ms,
                    )
                    self.lighthouse_url = self.lighthouse.start()
            elif cfg.lighthouse.url:
                self.lighthouse_url = cfg.lighthouse.url
            self.weaver = Weaver(
                nats_url=self.nats_url,
                liveness=cfg.liveness,
                retention=cfg.retention,
                control_settings=cfg.control,
                on_event=self.on_event,
                policies=self.policies,
                restore_policies=self.policies is None,
                creds=creds,
                replicas=cfg.nats.replicas,
                system_creds=system if cfg.watch_connections else None,
                ingest_workers=cfg.ingest_workers,
            )
            if ui is not None:
                # FastAPI is imported only where the dashboard is served
                from torchloom.weaver.web import Dashboard
                from torchloom.weaver.web.playground import Playground

                sd = self.secure_dir
                cert, key = (sd.cert_file, sd.key_file) if sd else (None, None)
                for port in (ui.port, 0) if ui.port_fallback else (ui.port,):
                    try:
                        self.dashboard = Dashboard(
                            self.weaver,
                            host=ui.host,
                            port=port,
                            token=self.ui_token,
                            tls_cert=cert,
                            tls_key=key,
                            playground=Playground(
                                samplers=dict(ui.samplers),
                                imports_dir=cfg.state_dir / "imports",
                            ),
                        )
                        break
                    except PortInUseError:
                        if port == 0 or not ui.port_fallback:
                            raise
            self._thread = threading.Thread(
                target=self._serve, name="torchloom-weaver", daemon=True
            )
            self._thread.start()
            deadline = time.monotonic() + timeout_s
            # a standby (another Weaver holds the lease) has started too: it takes over later
            while not (
                self._loop and (self.weaver.ready.is_set() or self.weaver.role == "standby")
            ):
                if self.error is not None or not self._thread.is_alive():
                    raise TorchloomError(f"the Weaver did not start: {self.error}")
                if time.monotonic() > deadline:
                    raise NotReachableError(
                        f"the Weaver could not reach NATS at {self.nats_url} within {timeout_s:g} s"
                    )
                time.sleep(0.02)
            write_endpoint(
                self.state_dir,
                nats_url=self.nats_url,
                pid=os.getpid(),
                embedded_nats=self.nats is not None,
                started_ts=time.time(),
                lighthouse_url=self.lighthouse_url or None,
                ui_url=self.dashboard.url if self.dashboard else None,
                nats_pid=self.nats.proc.pid if self.nats and self.nats.proc else None,
                nats_pids=self.cluster.pids if self.cluster else None,
                secure=self.secure_dir is not None,
                operator_creds=(
                    str(self.secure_dir.creds_file("operator")) if self.secure_dir else None
                ),
            )
        except BaseException:
            self.stop()
            raise

    def _system_credentials(self) -> Credentials:
        """The Weaver's user in the embedded servers' system account: an nkey made once for
        the state dir (0600), over TLS when the stack is secure."""
        path = (
            self.secure_dir.dir if self.secure_dir is not None else self.state_dir
        ) / "system.creds.json"
        if path.exists():
            return load_credentials(path)
        creds = Credentials(
            role="system",
            nkey_seed=new_nkey_seed(),
            ca_pem=self.secure_dir.ca_pem() if self.secure_dir is not None else None,
            tls=self.secure_dir is not None,
        )
        creds.save(path)
        return creds

    def _serve(self) -> None:
        if self.nice is not None:
            self.nice_applied = set_nice(self.nice)
        loop = asyncio.new_event_loop()
        self._loop = loop
        assert self.weaver is not None
        self._task = loop.create_task(self._main())
        try:
            loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:
            self.error = _first_cause(exc)
        finally:
            loop.close()

    async def _main(self) -> None:
        assert self.weaver is not None
        async with asyncio.TaskGroup() as group:  # one failing cancels the other
            group.create_task(self.weaver.run())
            if self.dashboard is not None:
                group.create_task(self.dashboard.serve())

    def alive(self) -> bool:
        """Whether the Weaver runs, with its lighthouse and NATS (a cluster: a majority of
        its servers — it goes on without the others)."""
        children = [self.lighthouse] + ([self.nats] if self.cluster is None else [])
        return (
            self._thread is not None
            and self._thread.is_alive()
            and (self.cluster is None or self.cluster.quorum_alive())
            and all(
                child.proc is not None and child.proc.poll() is None
                for child in children
                if child is not None
            )
        )

    def stop(self) -> None:
        """Stop the Weaver, then NATS; remove the endpoint; release the lock. Idempotent."""
        if self._loop is not None and self._task is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._task.cancel)
        if self._thread is not None:
            self._thread.join(10)
        if self.cluster is not None:
            self.cluster.stop()
        elif self.nats is not None:
            self.nats.stop()
        if self.lighthouse is not None:
            self.lighthouse.stop()
        if self._lock is not None:
            with contextlib.suppress(OSError):
                (self.state_dir / ENDPOINT_FILE).unlink(missing_ok=True)
            self._lock.close()
            self._lock = None


def _first_cause(exc: BaseException) -> BaseException:
    """The error itself, not the TaskGroup's wrapping ("unhandled errors in a TaskGroup")."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc

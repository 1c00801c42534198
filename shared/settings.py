"""Configuration, read once from the environment at start-up.

Names are the seed's (``CAMUNDA_BASE_URL``, ``SYNC_TIMEOUT_MS``, ...) so an operator
of the original service can keep their environment. Every setting has a default that
works for the local stack (`make up`). A bad value stops start-up with a message that
names the variable (see :func:`load_settings`).
"""

from __future__ import annotations

import base64
import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import (
    Field,
    PositiveInt,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from flowgate.shared.tenancy import ApiKey

#: What a worker serves and deploys unless told otherwise: the bundled examples.
DEFAULT_PROCESSES = "flowgate.services.worker.handlers:PROCESSES"
BUNDLED_BPMN = Path(__file__).resolve().parent.parent / "bpmn"
_HOST_NAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    # --- where the other parts live -------------------------------------------------
    camunda_base_url: str = "http://127.0.0.1:8080/engine-rest"
    # An engine whose REST API asks for credentials: HTTP basic (CAMUNDA_USERNAME with
    # CAMUNDA_PASSWORD) or a bearer token (CAMUNDA_TOKEN). Every engine call sends them.
    camunda_username: str | None = None
    camunda_password: SecretStr | None = None
    camunda_token: SecretStr | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    # REDIS_URL names a node of a Redis Cluster (any one: the rest are discovered).
    redis_cluster: bool = False
    database_url: str = "postgresql://flowgate:flowgate@127.0.0.1:5432/flowgate"
    # Every Redis key and channel starts with this, so environments can share a server.
    redis_prefix: str = Field(default="fg", pattern=r"^[A-Za-z0-9_-]{1,32}$")

    # One engine REST call (not a long poll) gives up after this: a start then answers 503.
    # Generous: under a burst the engine queues starts on its few database connections.
    camunda_timeout_ms: PositiveInt = 30_000
    # How long after it was sent an engine start may still create its instance (the engine's
    # own bound: its DB connection wait plus its transaction timeout, see deploy/camunda).
    # A start whose answer was lost is looked for this long before its claim is given up;
    # it must exceed CAMUNDA_TIMEOUT_MS.
    engine_start_window_ms: PositiveInt = 120_000
    # How often the replica that watches the engine's history reads it (runs whose steps
    # flowgate did not run end when their instance does; see services/background/watcher.py).
    watch_interval_ms: PositiveInt = 100
    # The Redis stream an engine with flowgate's plugin pushes its run events to (see
    # deploy/camunda and services/background/events.py): the watcher reads it instead of
    # the history while the engine says it pushes. Empty: always read the history.
    engine_events_stream: str = "flowgate:engine-events"
    # How often one replica samples the engine's backlog by topic for the workers'
    # autoscaler (services/background/backlog.py); 0 turns it off.
    backlog_interval_ms: Annotated[int, Field(ge=0)] = 5_000
    # How often one replica looks for runs past a step's declared `flowgate:stallAfter`
    # (services/background/stalls.py); 0 turns it off.
    stall_interval_ms: Annotated[int, Field(ge=0)] = 5_000

    # --- the API: how long a request waits ---------------------------------------------
    sync_timeout_ms: Annotated[int, Field(ge=0)] = 25_000
    # Where `make deploy-bpmn` / `flowgate-deploy` finds the *.bpmn files it deploys
    # (default: the bundled examples, bpmn/).
    bpmn_dir: Path = BUNDLED_BPMN
    # After deploying, flowgate-deploy checks the engine with a probe run (shared/engine_check.py):
    # `fail` stops on a missing setting that makes runs end wrong, `warn` only says it, `off`.
    engine_check: Literal["fail", "warn", "off"] = "fail"
    # Upper bound for `Prefer: wait=N` and `?wait=N`; keep it under the load balancer's
    # read timeout (deploy/ sets those to 75 s).
    max_wait_ms: PositiveInt = 60_000
    # How long a message the run does not wait for yet is held for it (services/api/messages.py).
    message_hold_ms: PositiveInt = 30_000
    # Retry-After of a 202 until the process's recent runs predict one (services/api/pace.py).
    retry_after_s: Annotated[int, Field(ge=1)] = 2
    # Terminal states stay in Redis this long; Postgres keeps them afterwards.
    result_ttl_s: PositiveInt = 86_400
    # A finished run's steps stay in Redis this long after its end, then only in Postgres
    # (its final state stays for RESULT_TTL_S). Past the engine's last late reports (10 s).
    steps_in_redis_s: Annotated[float, Field(ge=0)] = 30.0
    # What one replica may hold of ended runs' states in memory, to answer their status
    # reads without a round trip (services/api/settled.py); least recently read first out.
    settled_cache_mb: PositiveInt = 64
    # Pending states expire after this (a run that never finished does not live forever).
    pending_ttl_s: PositiveInt = 7 * 86_400
    max_body_bytes: PositiveInt = 1_048_576
    # A request body must arrive within this (a client that stops sending gets 408).
    body_timeout_s: PositiveInt = 10
    max_variables_depth: PositiveInt = 32
    # Shared secret the completion callback must present as a bearer token (off when unset).
    complete_token: SecretStr | None = None
    # Comma-separated client API keys for the client endpoints (off when empty): `KEY` (every
    # scope, the default tenant) or `KEY@TENANT:SCOPE+SCOPE` (shared/tenancy.py). When set,
    # /api/process/complete and /metrics need an `admin` key too unless their own token is set.
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()

    # --- who may do what (services/api/auth.py, services/api/oidc.py) --------------------
    # Bearer JWTs of this issuer are accepted besides API_KEYS (off when unset). Its keys come
    # from OIDC_JWKS_URL, else from the issuer's discovery document.
    oidc_issuer: str | None = None
    # The `aud` a token must name (required with OIDC_ISSUER).
    oidc_audience: str | None = None
    oidc_jwks_url: str | None = None
    # The claim naming a token's tenant (empty: every token is the default tenant's).
    oidc_tenant_claim: str = "tenant"
    # The claim listing a token's scopes (space-separated text or a list), and a prefix its
    # names carry (`flowgate:` makes `flowgate:start` the `start` scope).
    oidc_scopes_claim: str = "scope"
    oidc_scope_prefix: str = ""
    # The issuer's keys are read again this often; an outage keeps the cached ones.
    oidc_jwks_refresh_s: PositiveInt = 300
    # A token of an unknown key id reads the keys again, at most this often.
    oidc_jwks_min_refresh_s: Annotated[float, Field(ge=0)] = 1.0
    # Signs read tokens (`"readToken": true` on a start). Unset: a random key kept in Redis,
    # shared by every replica.
    read_token_secret: SecretStr | None = None
    read_token_ttl_s: PositiveInt = 900
    # Per-tenant limits (0: none), counted in Redis so every replica enforces the same:
    # starts per second, runs in flight, requests parked waiting, open event streams.
    tenant_starts_per_s: Annotated[int, Field(ge=0)] = 0
    tenant_runs_in_flight: Annotated[int, Field(ge=0)] = 0
    tenant_parked: Annotated[int, Field(ge=0)] = 0
    tenant_streams: Annotated[int, Field(ge=0)] = 0
    # Bearer token for /metrics of the API replicas and the workers (off when unset).
    metrics_token: SecretStr | None = None
    # Seconds uvicorn keeps idle connections: above common load-balancer idle timeouts.
    keepalive_s: PositiveInt = 75
    # Hard deadline for draining on SIGTERM (parked requests are answered at once).
    shutdown_grace_s: PositiveInt = 10

    # --- callbacks (services/background/callbacks.py) -------------------------------------------
    # Signs every callback (HMAC-SHA256 in the Flowgate-Signature header) when set.
    callback_secret: SecretStr | None = None
    # Comma-separated host names and CIDRs a callbackUrl may name; `*` allows any host. Empty
    # (the default outside `make up`): callbacks are off, a start naming one is 400.
    callback_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    # One delivery attempt gives up after this.
    callback_timeout_ms: PositiveInt = 10_000
    # Attempts before a callback is given up (backoff doubles from 1 s up to 10 min).
    callback_max_attempts: PositiveInt = 15

    # --- write-behind to Postgres --------------------------------------------------------
    # At most 5,000: a batch's ids are one script's arguments (Lua spreads at most ~8,000).
    writebehind_batch: Annotated[int, Field(ge=1, le=5_000)] = 500
    # How long a flusher pauses once it has caught up (less than a batch in every stream).
    writebehind_idle_ms: PositiveInt = 200
    # Entries a consumer left unacknowledged this long are claimed by another.
    writebehind_claim_idle_ms: PositiveInt = 30_000
    # Whether each API replica runs a flusher; false when `flowgate-flusher` processes do
    # (services/flusher/__main__.py), so the flusher takes no API core under load.
    writebehind_in_api: bool = True
    # The standalone flusher's /healthz and /metrics (0 = off), and their interface.
    flusher_health_port: Annotated[int, Field(ge=0, le=65_535)] = 8082
    flusher_health_host: str = "127.0.0.1"

    # --- the worker ----------------------------------------------------------------------
    camunda_max_tasks: PositiveInt = 10
    camunda_lock_duration_ms: PositiveInt = 20_000
    camunda_async_response_timeout_ms: Annotated[int, Field(ge=0, le=1_800_000)] = 30_000
    worker_concurrency: PositiveInt = 10
    # Tasks a worker locks ahead of its free slots, so its next poll is open while a batch
    # runs (0: fetch only for free slots).
    worker_prefetch: Annotated[int, Field(ge=0, le=1_000)] = 10
    # Threads for synchronous (plain `def`) handlers: at most this many run at once.
    worker_threads: Annotated[int, Field(ge=1, le=1_000)] = 10
    worker_retries: Annotated[int, Field(ge=0)] = 3
    worker_retry_timeout_ms: Annotated[int, Field(ge=0)] = 1_000
    worker_shutdown_grace_s: PositiveInt = 10
    worker_health_port: Annotated[int, Field(ge=0, le=65_535)] = 8081
    # The interface of the worker's /healthz and /metrics port (0.0.0.0 for probes from
    # outside the host, as in a container).
    worker_health_host: str = "127.0.0.1"
    # The processes a worker serves: comma-separated `module:attribute` names of Process
    # objects, registries or sequences of processes (services/worker/registry.py). The
    # default is the repository's example; the flowgate image sets none (deploy/Dockerfile).
    worker_processes: str = DEFAULT_PROCESSES
    # Names the worker's restart slots (default: the host name; see services/worker/identity.py).
    worker_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$")
    log_level: str = Field(default="INFO", pattern=r"(?i)^(debug|info|warning|error)$")

    # --- api server ----------------------------------------------------------------------
    # Where `python -m flowgate.services.api` listens.
    api_host: str = "127.0.0.1"
    api_port: Annotated[int, Field(ge=0, le=65_535)] = 8000
    # Names this replica's write-behind consumer; hostname-pid when unset.
    replica_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._:-]{1,64}$")
    # Requests parked at once per replica; beyond it a start or long-poll answers 202 at
    # once (OWASP API4: a bounded resource, not a way to exhaust memory).
    max_parked: PositiveInt = 20_000
    # Process keys whose starts may name system variables (correlationId, batch_id, ...) in
    # `variables`; flowgate's values replace the client's, as the seed did. For any other
    # process such a start is 400 naming the variable.
    system_variables_from_clients: Annotated[tuple[str, ...], NoDecode] = ()

    @field_validator(
        "api_keys", "callback_allowed_hosts", "system_variables_from_clients", mode="before"
    )
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value

    @field_validator("api_keys")
    @classmethod
    def _key_entries(cls, value: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        for entry in value:
            ApiKey.parse(entry.get_secret_value())  # raises naming what is wrong
        return value

    @field_validator("callback_allowed_hosts")
    @classmethod
    def _hosts_or_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            if entry == "*":
                continue
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                if not _HOST_NAME.fullmatch(entry):
                    raise ValueError(f"{entry!r} is neither a host name nor a CIDR") from None
        return value

    @field_validator("camunda_base_url")
    @classmethod
    def _strip_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_engine_credential(self) -> Self:
        if (self.camunda_username is None) != (self.camunda_password is None):
            raise ValueError("CAMUNDA_USERNAME and CAMUNDA_PASSWORD go together")
        if self.camunda_username is not None and self.camunda_token is not None:
            raise ValueError("CAMUNDA_TOKEN or CAMUNDA_USERNAME/CAMUNDA_PASSWORD, not both")
        return self

    @property
    def camunda_authorization(self) -> str | None:
        """The ``Authorization`` header every engine call sends, if the engine wants one."""
        if self.camunda_token is not None:
            return f"Bearer {self.camunda_token.get_secret_value()}"
        if self.camunda_username is not None and self.camunda_password is not None:
            pair = f"{self.camunda_username}:{self.camunda_password.get_secret_value()}"
            return "Basic " + base64.b64encode(pair.encode()).decode()
        return None

    @model_validator(mode="after")
    def _oidc_complete(self) -> Self:
        if self.oidc_issuer is not None and not self.oidc_audience:
            raise ValueError(
                "OIDC_ISSUER needs OIDC_AUDIENCE: a token meant for another service must fail"
            )
        return self

    @model_validator(mode="after")
    def _window_beyond_the_engine_timeout(self) -> Self:
        if self.engine_start_window_ms <= self.camunda_timeout_ms:
            raise ValueError(
                "ENGINE_START_WINDOW_MS must exceed CAMUNDA_TIMEOUT_MS: an engine start is"
                " looked for after its own call gave up"
            )
        return self


class SettingsError(SystemExit):
    """Start-up stops: a setting has a bad value. The message names the variable.

    A ``SystemExit`` with a text: left uncaught, Python prints it and exits with 1.
    """


def settings_error(exc: ValidationError, what: str = "configuration") -> SettingsError:
    """A :class:`SettingsError` naming each bad variable of ``exc``."""
    lines = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]).upper()
        # A value is shown only where it is one field's and no secret: a rule across fields
        # would show them all, credentials included.
        shown = name and not any(word in name for word in _SECRET_WORDS)
        got = f" (got {err.get('input')!r})" if shown else ""
        lines.append(f"  {name or 'settings'}: {err['msg']}{got}")
    return SettingsError(f"invalid {what}:\n" + "\n".join(lines))


_SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET", "KEY")


def load_settings(**overrides: object) -> Settings:
    """Read the environment; on a bad value raise :class:`SettingsError` naming it."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise settings_error(exc) from exc

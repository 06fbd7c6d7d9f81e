"""Typed, frozen gateway configuration, loaded from YAML and validated once at startup.

pydantic does the type checking and reports every problem with the dotted key it
belongs to; this module adds `${VAR}` expansion from the environment and `*_file`
secrets, and turns every failure into one `ConfigError` listing all problems.
Nothing else in the gateway reads YAML or the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

#: Algorithms accepted in `auth.jwt.algorithms`; 'none' is deliberately absent.
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


class ConfigError(Exception):
    """Invalid configuration: `problems` lists every `key: what is wrong` found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveSeconds = Annotated[float, Field(gt=0)]


class ServerConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    allowed_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    max_connections: int = Field(20000, ge=1)
    max_connections_per_consumer: int = Field(64, ge=1)
    max_connections_per_ip: int = Field(256, ge=1)
    drain_timeout: PositiveSeconds = 10.0

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            if origin.strip() == "*":
                raise ValueError("'*' is refused: it would let any web site use your users' sessions and "
                                 "read their streams; list each origin (https://app.example.com)")
            if not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"{origin!r} is not an origin like https://app.example.com (no path)")
        return tuple(o.rstrip("/") for o in value)


class UpstreamConfig(_Section):
    base_url: str = "https://api.layerlens.ai"
    api_key: str | None = Field(None, repr=False)
    api_key_file: Path | None = None
    connect_timeout: PositiveSeconds = 10.0
    read_timeout: PositiveSeconds = 90.0
    backoff_initial: PositiveSeconds = 0.5
    backoff_max: PositiveSeconds = 30.0
    optimization_ws_path: str = "/ws/optimization"
    ws_ping_interval: PositiveSeconds = 20.0
    #: Largest upstream event (SSE line or event data, job WebSocket message); past it the stream fails.
    max_event_bytes: int = Field(1 << 20, ge=1024)
    #: Largest polling or listing answer read from the upstream; past it the browser gets a 502.
    max_response_bytes: int = Field(4 << 20, ge=1024)

    @field_validator("base_url")
    @classmethod
    def _origin_only(cls, value: str) -> str:
        if not re.fullmatch(r"https?://[^/\s]+/?", value):
            raise ValueError("must be an origin like https://api.layerlens.ai (the gateway appends /api/v1/...)")
        return value.rstrip("/")

    @field_validator("optimization_ws_path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @model_validator(mode="after")
    def _key_present(self) -> UpstreamConfig:
        if not self.api_key:
            raise ValueError("upstream.api_key (or api_key_file) is required")
        return self

    @property
    def ws_url(self) -> str:
        return "ws" + self.base_url[len("http"):] + self.optimization_ws_path


class JWTConfig(_Section):
    algorithms: tuple[str, ...] = ("HS256",)
    secret: str | None = Field(None, repr=False)
    secret_file: Path | None = None
    public_key: str | None = None
    public_key_file: Path | None = None
    jwks_url: str | None = None
    jwks_cache_ttl: PositiveSeconds = 300.0
    jwks_min_refresh_interval: PositiveSeconds = 30.0
    audience: str | tuple[str, ...] | None = None
    issuer: str | tuple[str, ...] | None = None
    leeway: float = Field(30.0, ge=0)
    consumer_claim: str = "sub"
    streams_claim: str = "streams"
    max_token_bytes: int = Field(8192, ge=256)

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one algorithm is required")
        for alg in value:
            if alg.lower() == "none":
                raise ValueError("'none' is never accepted")
            if alg not in HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS:
                raise ValueError(f"unsupported algorithm {alg!r}")
        return value

    @model_validator(mode="after")
    def _keys(self) -> JWTConfig:
        hmac = [a for a in self.algorithms if a in HMAC_ALGORITHMS]
        public = [a for a in self.algorithms if a in PUBLIC_KEY_ALGORITHMS]
        if hmac and public:
            raise ValueError("mixing HMAC and public-key algorithms invites key confusion; pin one family")
        if hmac and not self.secret:
            raise ValueError(f"auth.jwt.secret (or secret_file) is required for {', '.join(hmac)}")
        if hmac and len(self.secret or "") < 32:
            raise ValueError("auth.jwt.secret must be at least 32 characters for HMAC signing")
        if public and not (self.public_key or self.jwks_url):
            raise ValueError(f"auth.jwt.public_key, public_key_file or jwks_url is required for {', '.join(public)}")
        if self.jwks_url and not self.audience:
            raise ValueError("auth.jwt.audience is required with jwks_url: an identity provider's keys sign "
                             "tokens for many applications, and only the audience says which are for this gateway")
        return self


class AuthConfig(_Section):
    jwt: JWTConfig = Field(default_factory=JWTConfig)
    cookie: str | None = "gateway_session"
    query_param: str | None = None
    authorize_url: str | None = None
    authorize_cache_ttl: float = Field(30.0, ge=0)
    authorize_timeout: PositiveSeconds = 2.0
    #: Webhook calls in flight at once (the rest wait, within `authorize_timeout`).
    authorize_concurrency: int = Field(16, ge=1)
    #: Seconds a failed webhook call (timeout, 5xx, bad JSON) is remembered as a denial.
    authorize_failure_ttl: float = Field(5.0, ge=0)
    #: Seconds between two re-checks of the webhook's decisions for open streams (revocation).
    recheck_interval: PositiveSeconds = 300.0


class LimitsConfig(_Section):
    heartbeat: PositiveSeconds = 15.0
    replay_buffer: int = Field(10000, ge=1)
    linger: float = Field(30.0, ge=0)
    one_stream_per_consumer: Literal["replace", "reject"] = "replace"
    inactivity_timeout: PositiveSeconds = 3600.0
    poll_cache_ttl: float = Field(2.0, ge=0)
    subscriber_buffer: int = Field(1 << 20, ge=1024)
    send_timeout: PositiveSeconds = 30.0
    history_ttl: float = Field(300.0, ge=0)
    max_streams: int = Field(10000, ge=1)
    #: Distinct streams one consumer may hold at once, across SSE and WebSocket.
    max_streams_per_consumer: int = Field(64, ge=1)
    #: Bytes all ended streams' retained histories may hold together; the oldest unread go first.
    ended_history_bytes: int = Field(256 << 20, ge=0)


class WebSocketConfig(_Section):
    max_subscriptions: int = Field(32, ge=1)
    max_message_bytes: int = Field(4096, ge=64)
    messages_per_second: float = Field(20.0, gt=0)
    message_burst: int = Field(40, ge=1)
    #: Seconds of silence from a client before the gateway pings it, and how long the ping may go unanswered.
    ping_interval: PositiveSeconds = 20.0
    ping_timeout: PositiveSeconds = 20.0


class MetricsConfig(_Section):
    enabled: bool = True
    port: int | None = Field(None, ge=0, le=65535)
    host: str = "127.0.0.1"


class DashboardConfig(_Section):
    enabled: bool = False


class BrokerConfig(_Section):
    kind: Literal["memory", "redis"] = "memory"
    #: One Redis (or, with `cluster`, any node of a Redis Cluster): redis:// or rediss://, credentials inside.
    url: str | None = Field(None, repr=False)
    url_file: Path | None = None
    #: Redis Sentinel instead of `url`: the sentinels ("host:port") and the name of the monitored master.
    sentinels: tuple[str, ...] = ()
    sentinel_master: str | None = None
    #: The password of the Redis master and replicas (Sentinel mode; with `url` it goes in the URL).
    password: str | None = Field(None, repr=False)
    password_file: Path | None = None
    #: The sentinels' own password, if they require one.
    sentinel_password: str | None = Field(None, repr=False)
    sentinel_password_file: Path | None = None
    #: `url` names a node of a Redis Cluster (every stream's keys share one hash slot).
    cluster: bool = False
    key_prefix: str = "gw:"
    lease_ttl: PositiveSeconds = 5.0
    #: Seconds Redis may be unreachable before /readyz reports this replica not ready.
    unready_after: PositiveSeconds = 30.0
    #: Most connections this replica opens to Redis (per node with `cluster`), however many streams it serves.
    max_connections: int = Field(32, ge=2)

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if "{" in value or "}" in value:
            raise ValueError("must not contain '{' or '}' (each stream's keys use its name as a Redis hash tag)")
        return value

    @field_validator("sentinels")
    @classmethod
    def _sentinels(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            host, sep, port = entry.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{entry!r} is not host:port")
        return value

    @model_validator(mode="after")
    def _url(self) -> BrokerConfig:
        if self.kind != "redis":
            return self
        if self.sentinels:
            if self.url:
                raise ValueError("set either broker.url or broker.sentinels, not both")
            if not self.sentinel_master:
                raise ValueError("broker.sentinel_master is required with broker.sentinels")
            if self.cluster:
                raise ValueError("broker.cluster and broker.sentinels exclude each other")
        elif not self.url:
            raise ValueError("broker.url (or url_file, or sentinels) is required when broker.kind is redis")
        return self

    def endpoints(self) -> tuple[tuple[str, int], ...]:
        """The sentinels as (host, port)."""
        return tuple((host, int(port)) for host, _, port in (s.rpartition(":") for s in self.sentinels))


#: Shortest `admin.api_key` accepted: an operator key guards every stream, so it must not be guessable.
MIN_ADMIN_KEY_LENGTH = 32


class AdminConfig(_Section):
    """The operators' API under /admin (off unless `api_key` is set: then /admin/* answers 404)."""

    api_key: str | None = Field(None, repr=False)
    api_key_file: Path | None = None

    @field_validator("api_key")
    @classmethod
    def _long_enough(cls, value: str | None) -> str | None:
        if value is not None and len(value) < MIN_ADMIN_KEY_LENGTH:
            raise ValueError(f"must be at least {MIN_ADMIN_KEY_LENGTH} characters (e.g. `openssl rand -hex 32`)")
        return value


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class GatewayConfig(_Section):
    """The whole configuration; see config/gateway.yaml for every key and its default."""

    server: ServerConfig = Field(default_factory=ServerConfig)
    upstream: UpstreamConfig
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    websocket: WebSocketConfig = Field(default_factory=WebSocketConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig)
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _admin_key_is_its_own(self) -> GatewayConfig:
        key = self.admin.api_key
        if key is not None and key in (self.upstream.api_key, self.auth.jwt.secret):
            raise ValueError("admin.api_key must differ from upstream.api_key and auth.jwt.secret")
        return self

    def secrets(self) -> tuple[str, ...]:
        """Every secret value, so log and response scrubbers can look for them."""
        broker = self.broker
        values = [self.upstream.api_key, self.auth.jwt.secret, self.admin.api_key, broker.password,
                  broker.sentinel_password]
        if broker.url:
            values.append(broker.url)
            password = urlsplit(broker.url).password
            if password:
                values += [password, unquote(password)]
        return tuple(v for v in values if v)


def _expand(node: Any, path: str, env: Mapping[str, str], problems: list[str]) -> Any:
    if isinstance(node, dict):
        return {k: _expand(v, f"{path}.{k}" if path else str(k), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, f"{path}[{i}]", env, problems) for i, v in enumerate(node)]
    if isinstance(node, str):
        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env or env[name] == "":
                problems.append(f"{path}: environment variable {name} is not set")
                return ""
            return env[name]

        return _VAR.sub(substitute, node)
    return node


_FILE_KEYS = (("upstream", "api_key"), ("auth.jwt", "secret"), ("auth.jwt", "public_key"), ("broker", "url"),
              ("broker", "password"), ("broker", "sentinel_password"), ("admin", "api_key"))


def _read_files(data: dict[str, Any], problems: list[str]) -> None:
    for section_path, key in _FILE_KEYS:
        section: Any = data
        for part in section_path.split("."):
            section = section.get(part) if isinstance(section, dict) else None
        if not isinstance(section, dict) or not isinstance(section.get(f"{key}_file"), str) \
                or not section[f"{key}_file"]:
            continue  # absent, or not a path: pydantic reports the type problem
        file_key = f"{section_path}.{key}_file"
        if section.get(key):
            problems.append(f"{file_key}: set either {key} or {key}_file, not both")
            continue
        try:
            section[key] = Path(section[f"{key}_file"]).read_text().strip()
        except OSError as exc:
            problems.append(f"{file_key}: cannot read {section[f'{key}_file']}: {exc.strerror}")


def _format(error: Any) -> str:
    loc = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "missing":
        message = "required key is missing"
    return f"{loc}: {message}" if loc else message


def parse_config(data: Any, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(["top level: expected a mapping of sections"])
    problems: list[str] = []
    expanded = _expand(data, "", env, problems)
    _read_files(expanded, problems)
    # A missing auth.jwt is validated as an empty section: its default cannot be built without a
    # secret, and a failing default would abort validation with just that one problem.
    auth = expanded.setdefault("auth", {})
    if isinstance(auth, dict):
        auth.setdefault("jwt", {})
    try:
        config = GatewayConfig.model_validate(expanded)
    except ValidationError as exc:
        problems.extend(_format(err) for err in exc.errors())
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return config


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and validate a YAML config file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    return parse_config(data, env)

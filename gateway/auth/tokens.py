"""Browser session tokens: where they are read from and how they are verified.

Algorithms are pinned by configuration and one key family is used at a time, so a
token cannot pick its own verification (`alg: none`, or HMAC keyed with a public key).
`exp` is required; `nbf`/`iat` honour `leeway`; `aud`/`iss` are checked when set.
JWKS keys are fetched asynchronously, cached, selected by `kid`, and refetched on an
unknown `kid` at most once per `jwks_min_refresh_interval`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl

import httpx
import jwt
from jwt.algorithms import get_default_algorithms

from gateway.config import HMAC_ALGORITHMS, AuthConfig, ConfigError
from gateway.errors import AuthError


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated browser consumer."""

    consumer: str
    claims: Mapping[str, Any] = field(repr=False)
    expires_at: float
    streams: tuple[str, ...] = ()
    #: `exp` plus the configured leeway: the last instant admission accepts the token, so the
    #: instant its open streams end (no accept-then-close loop in between). Defaults to `expires_at`.
    valid_until: float = 0.0

    def __post_init__(self) -> None:
        if not self.valid_until:
            object.__setattr__(self, "valid_until", self.expires_at)


def _invalid(reason: str, message: str) -> AuthError:
    return AuthError(message, status=401, code="invalid_token", reason=reason)


_JWT_ERRORS: tuple[tuple[type[Exception], str, str], ...] = (
    (jwt.ExpiredSignatureError, "expired", "token has expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid", "token is not yet valid"),
    (jwt.InvalidAudienceError, "bad_audience", "token audience is not accepted"),
    (jwt.InvalidIssuerError, "bad_issuer", "token issuer is not accepted"),
    (jwt.MissingRequiredClaimError, "missing_claim", "token lacks a required claim"),
    (jwt.InvalidSignatureError, "bad_signature", "token signature is invalid"),
    (jwt.InvalidAlgorithmError, "bad_algorithm", "token algorithm is not allowed"),
    (jwt.InvalidKeyError, "bad_key", "token cannot be verified with the configured key"),
    (jwt.DecodeError, "malformed", "token is malformed"),
)


_NO_CLAIMS: Mapping[str, Any] = MappingProxyType({})

#: Verified tokens remembered at most (about 200 bytes each, claims shared with their principal).
VERIFIED_CACHE_SIZE = 65536


class Authenticator:
    """Verifies session tokens against the configured key material."""

    def __init__(self, config: AuthConfig, client: httpx.AsyncClient | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.jwt = config.jwt
        self.clock = clock
        self._client = client
        self._algorithms = list(self.jwt.algorithms)
        self._static_keys: dict[str, Any] = {}
        self._jwks: dict[str, jwt.PyJWK] = {}
        self._jwks_fetched_at = 0.0
        self._jwks_lock = asyncio.Lock()
        #: Verified tokens by digest, oldest first (see `authenticate`).
        self._verified: OrderedDict[bytes, tuple[float, Principal]] = OrderedDict()
        self._prepare_static_keys()

    def _prepare_static_keys(self) -> None:
        algorithms = get_default_algorithms()
        problems: list[str] = []
        for alg in self._algorithms:
            if alg in HMAC_ALGORITHMS:
                self._static_keys[alg] = (self.jwt.secret or "").encode()
            elif self.jwt.public_key:
                try:
                    self._static_keys[alg] = algorithms[alg].prepare_key(self.jwt.public_key)
                except Exception as exc:
                    problems.append(f"auth.jwt.public_key: not a usable {alg} public key ({type(exc).__name__})")
        if problems:
            raise ConfigError(problems)

    def extract(self, headers: Mapping[str, str], query_string: bytes = b"") -> str:
        """The token from `Authorization: Bearer`, then the cookie, then (if enabled) the query."""
        authorization = headers.get("authorization")
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise AuthError("Authorization header must be 'Bearer <token>'", reason="malformed_header")
            return value.strip()
        cookie_name = self.config.cookie
        raw_cookie = headers.get("cookie")
        if cookie_name and raw_cookie:
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(raw_cookie)
            except CookieError:
                jar = SimpleCookie()
            morsel = jar.get(cookie_name)
            if morsel is not None and morsel.value:
                return morsel.value
        if self.config.query_param and query_string:
            for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=False):
                if name == self.config.query_param and value:
                    return value
        raise AuthError("a session token is required", reason="missing_token", code="missing_token")

    async def authenticate(self, token: str) -> Principal:
        """Verify `token` and return its principal, or raise AuthError (401).

        A verified token is remembered (by a digest of the whole token) until it expires, so a
        browser that reconnects with the same token, in a reconnect storm say, costs a
        dictionary lookup instead of a signature check. A token verified with a JWKS key is
        remembered no longer than the keys are (`jwks_cache_ttl`): a key withdrawn from the
        JWKS stops being honoured as soon as it would without the cache.
        """
        if len(token) > self.jwt.max_token_bytes:
            raise _invalid("too_large", "token is too large")
        digest = hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=20).digest()
        cached = self._verified.get(digest)
        if cached is not None:
            if cached[0] > self.clock():
                self._verified.move_to_end(digest)
                return cached[1]
            del self._verified[digest]
        principal, from_jwks = await self._verify(token)
        until = principal.valid_until
        if from_jwks:
            until = min(until, self._jwks_fetched_at + self.jwt.jwks_cache_ttl)
        self._verified[digest] = (until, principal)
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return principal

    def forget(self) -> None:
        """Drop every remembered verification (the next use of each token is verified again)."""
        self._verified.clear()

    async def _verify(self, token: str) -> tuple[Principal, bool]:
        """The token's principal, and whether a JWKS key verified it."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise _invalid("malformed", "token is malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise _invalid("bad_algorithm", "token algorithm is not allowed")
        key = await self._key_for(alg, header.get("kid"))
        audience = self.jwt.audience
        issuer = self.jwt.issuer
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=list(audience) if isinstance(audience, tuple) else audience,
                issuer=list(issuer) if isinstance(issuer, tuple) else issuer,
                leeway=self.jwt.leeway,
                options={"require": ["exp"], "verify_aud": audience is not None},
            )
        except jwt.PyJWTError as exc:
            for kind, reason, message in _JWT_ERRORS:
                if isinstance(exc, kind):
                    raise _invalid(reason, message) from None
            raise _invalid("invalid", "token is invalid") from None
        consumer = claims.get(self.jwt.consumer_claim)
        if not isinstance(consumer, str) or not consumer:
            raise _invalid("missing_consumer", f"token lacks the '{self.jwt.consumer_claim}' claim")
        streams = claims.get(self.jwt.streams_claim, ())
        if isinstance(streams, str):
            streams = streams.split()
        if not isinstance(streams, list | tuple) or not all(isinstance(s, str) for s in streams):
            raise _invalid("bad_streams_claim", f"the '{self.jwt.streams_claim}' claim must be a list of strings")
        expires_at = float(claims["exp"])
        # The claims are only ever read again to send them to the webhook; without one, an open
        # stream (and the verified-token cache) need not keep them.
        kept = claims if self.config.authorize_url else _NO_CLAIMS
        return Principal(consumer=consumer, claims=kept, expires_at=expires_at, streams=tuple(streams),
                         valid_until=expires_at + self.jwt.leeway), alg not in self._static_keys

    async def _key_for(self, alg: str, kid: object) -> Any:
        if alg in self._static_keys:
            return self._static_keys[alg]
        if not self.jwt.jwks_url:
            raise _invalid("bad_algorithm", "token algorithm is not allowed")
        if not isinstance(kid, str) or not kid:
            raise _invalid("missing_kid", "token header lacks 'kid'")
        key = self._jwks.get(kid)
        stale = self.clock() - self._jwks_fetched_at > self.jwt.jwks_cache_ttl
        if key is None or stale:
            await self._refresh_jwks(force=key is None)
            key = self._jwks.get(kid)
        if key is None:
            raise _invalid("unknown_kid", "token key id is unknown")
        declared = key.algorithm_name if key.algorithm_name in self._algorithms else None
        if declared is not None and declared != alg:
            raise _invalid("bad_algorithm", "token algorithm does not match its key")
        return key.key

    async def _refresh_jwks(self, force: bool) -> None:
        async with self._jwks_lock:
            since = self.clock() - self._jwks_fetched_at
            if since < self.jwt.jwks_min_refresh_interval or (not force and since < self.jwt.jwks_cache_ttl):
                return
            if self._client is None:
                self._client = httpx.AsyncClient()
            self._jwks_fetched_at = self.clock()
            try:
                response = await self._client.get(str(self.jwt.jwks_url), timeout=5.0)
                response.raise_for_status()
                data = response.json()
            except (httpx.HTTPError, ValueError):
                if not self._jwks:
                    raise AuthError("token keys are unavailable", status=503, code="keys_unavailable",
                                    retry_after=self.jwt.jwks_min_refresh_interval) from None
                return
            keys: dict[str, jwt.PyJWK] = {}
            for entry in data.get("keys", []) if isinstance(data, dict) else []:
                try:
                    jwk = jwt.PyJWK(entry)
                except jwt.PyJWTError:
                    continue
                if jwk.key_id and (jwk.algorithm_name in self._algorithms):
                    keys[jwk.key_id] = jwk
            self._jwks = keys


def mint_token(secret_or_key: str | bytes, algorithm: str, subject: str, ttl: float,
               claims: Mapping[str, Any] | None = None, clock: Callable[[], float] = time.time,
               headers: Mapping[str, Any] | None = None) -> str:
    """Sign a session token (for `gateway token`, the demo and tests)."""
    now = int(clock())
    payload: dict[str, Any] = {"sub": subject, "iat": now, "exp": now + int(ttl)}
    payload.update(claims or {})
    return jwt.encode(payload, secret_or_key, algorithm=algorithm, headers=dict(headers) if headers else None)

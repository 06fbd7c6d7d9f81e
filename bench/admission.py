"""The cost of one admission, in-process, by token kind: what a reconnect storm pays per subscriber.

    python -m bench.admission             # 2,000 admissions per kind and case, best of 5 rounds
    python -m bench.admission --count 500 --rounds 3

Times the gateway's own admission path (`Admission.admit`: token extraction, verification,
authorization by the token's `streams` claim, client address), called in a loop on one
event loop, with no sockets and no HTTP parsing. Token kinds: HS256 with a shared secret,
and RS256 and ES256 with keys from a JWKS URL served on loopback by this process (fetched
once, then cached, as in production). Each kind is timed with distinct tokens (every
admission a new token and a new `sub`, as in a storm) and with one token repeated (a cache
of verified tokens would show here). For comparison, `authenticate` alone, and PyJWT's
`jwt.decode` alone on the same tokens (the signature check and claim validation the
gateway cannot avoid). Results: `bench/results/admission.json` and `admission.md`.

For a flame graph of the loop: `py-spy record -o admission.svg -- python -m bench.admission`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from bench.internals import build_admission, header_map, mint_token, validate_resource

RESULTS = Path(__file__).resolve().parent / "results"
RESOURCE = ("evaluations", "e-bench-1")
KINDS = ("HS256", "RS256", "ES256")


class JWKSServer:
    """A JWKS document on loopback (one GET, one JSON answer), served from this event loop."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.body = json.dumps({"keys": keys}).encode()
        self.server: asyncio.Server | None = None
        self.requests = 0

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._answer, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/.well-known/jwks.json"

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.requests += 1
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                     b"connection: close\r\n\r\n%s" % (len(self.body), self.body))
        await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


#: The audience the JWKS kinds carry (the gateway requires one with `jwks_url`).
AUDIENCE = "bench-gateway"


class Kind:
    """One token kind: how the gateway is configured for it, and how its tokens are signed."""

    def __init__(self, name: str, jwt_section: dict[str, Any], signing_key: Any, verify_key: Any,
                 kid: str | None = None) -> None:
        self.name = name
        self.jwt_section = jwt_section
        self.signing_key = signing_key
        self.verify_key = verify_key
        self.kid = kid

    def mint(self, subject: str) -> str:
        headers = {"kid": self.kid} if self.kid else None
        claims: dict[str, Any] = {"streams": ["evaluations/*"]}
        if "audience" in self.jwt_section:
            claims["aud"] = self.jwt_section["audience"]
        return mint_token(self.signing_key, self.name, subject, 3600, claims, headers=headers)


def make_kinds(jwks_url: str) -> tuple[list[Kind], list[dict[str, Any]]]:
    """The three kinds and the JWKS (public keys) the RS256 and ES256 ones are verified with."""
    secret = secrets.token_hex(32)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwks = [
        {**RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True), "kid": "bench-rsa", "alg": "RS256", "use": "sig"},
        {**ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True), "kid": "bench-ec", "alg": "ES256", "use": "sig"},
    ]
    kinds = [
        Kind("HS256", {"algorithms": ["HS256"], "secret": secret}, secret, secret.encode()),
        Kind("RS256", {"algorithms": ["RS256"], "jwks_url": jwks_url, "audience": AUDIENCE}, rsa_key,
             rsa_key.public_key(), "bench-rsa"),
        Kind("ES256", {"algorithms": ["ES256"], "jwks_url": jwks_url, "audience": AUDIENCE}, ec_key,
             ec_key.public_key(), "bench-ec"),
    ]
    return kinds, jwks


async def _best(call: Callable[[str], Awaitable[object]], passes: list[list[str]]) -> float:
    """Microseconds per call: the best of the passes (the least disturbed by the machine)."""
    best = float("inf")
    for tokens in passes:
        started = time.perf_counter_ns()
        for token in tokens:
            await call(token)
        best = min(best, (time.perf_counter_ns() - started) / len(tokens) / 1000)
    return best


async def measure(count: int = 2000, rounds: int = 5) -> dict[str, Any]:
    """µs per admission, per authentication and per PyJWT decode, for each kind, distinct and repeated tokens."""
    jwks_server = JWKSServer([])
    url = await jwks_server.start()
    kinds, jwks = make_kinds(url)
    jwks_server.body = json.dumps({"keys": jwks}).encode()
    rows: list[dict[str, Any]] = []
    async with httpx.AsyncClient() as client:
        try:
            for kind in kinds:
                admission, authenticator = build_admission(kind.jwt_section, client)
                # Distinct tokens are new in every pass: the gateway has never seen them (a storm of
                # first sights). A repeated token was verified once and is then remembered.
                distinct = [[kind.mint(f"user-{r}-{i}") for i in range(count)] for r in range(rounds)]
                repeated = [[distinct[0][0]] * count] * rounds

                async def admit(token: str, admission: Any = admission) -> object:
                    # What the SSE endpoint does before it subscribes: headers, resource name, admission.
                    scope = {"type": "http", "scheme": "http", "path": "/api/v1/evaluations/e-bench-1/stream",
                             "query_string": b"", "client": ("127.0.0.1", 40000),
                             "headers": [(b"host", b"bench"), (b"accept", b"text/event-stream"),
                                         (b"authorization", b"Bearer " + token.encode())]}
                    resource = validate_resource(*RESOURCE)
                    admitted = await admission.admit(scope, header_map(scope))
                    await admission.authorize(admitted, resource)
                    return admitted

                async def decode(token: str, kind: Kind = kind) -> object:
                    return jwt.decode(token, kind.verify_key, algorithms=[kind.name], leeway=30,
                                      options={"require": ["exp"], "verify_aud": False})  # audience: see `Kind`

                await admit(kind.mint("warm-up"))  # fetches the JWKS once, like the first request after a start
                row: dict[str, Any] = {"kind": kind.name, "jwks": "jwks_url" in kind.jwt_section, "count": count}
                for case, passes in (("distinct", distinct), ("repeated", repeated)):
                    # Each measurement gets its own first sight of the distinct tokens.
                    authenticator.forget()
                    row[f"admit_{case}_us"] = await _best(admit, passes)
                    authenticator.forget()
                    row[f"authenticate_{case}_us"] = await _best(authenticator.authenticate, passes)
                    row[f"decode_{case}_us"] = await _best(decode, passes)
                rows.append(row)
                print(f"  {kind.name}: admit {row['admit_distinct_us']:.1f} µs (distinct tokens), "
                      f"{row['admit_repeated_us']:.1f} µs (one token repeated); PyJWT decode alone "
                      f"{row['decode_distinct_us']:.1f} µs", flush=True)
        finally:
            await jwks_server.close()
    return {"rows": rows, "jwks_requests": jwks_server.requests}


def markdown(document: dict[str, Any]) -> str:
    lines = [
        f"# Admission cost by token kind, {document['started']}",
        "",
        f"Python {document['machine']['python']}, PyJWT {document['machine']['pyjwt']}; in-process, one event loop, "
        f"no sockets; best of {document['rounds']} passes of {document['count']:,} admissions; microseconds per call. "
        f"The JWKS was fetched {document['jwks_requests']} time(s) in all.",
        "",
        "| token | admit, a token seen first | admit, a token seen before (cached) | authenticate (first sight) | "
        "PyJWT decode alone | gateway's share of a first admit |",
        "|---|---|---|---|---|---|",
    ]
    for row in document["rows"]:
        name = row["kind"] + (" (JWKS)" if row["jwks"] else " (secret)")
        share = 1 - row["decode_distinct_us"] / row["admit_distinct_us"] if row["admit_distinct_us"] else 0
        lines.append(f"| {name} | {row['admit_distinct_us']:.1f} | {row['admit_repeated_us']:.1f} | "
                     f"{row['authenticate_distinct_us']:.1f} | {row['decode_distinct_us']:.1f} | {share:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.admission", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2000, help="admissions per kind and case (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="passes per measurement; the best counts (default 5)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default bench/results)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    started = time.time()
    result = runner(measure(args.count, args.rounds))
    document = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "machine": {"python": platform.python_version(), "pyjwt": jwt.__version__},
        "count": args.count, "rounds": args.rounds, **result,
    }
    text = markdown(document)
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "admission.json").write_text(json.dumps(document, indent=1))
        (args.out / "admission.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

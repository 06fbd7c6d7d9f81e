"""The `gateway` command: serve, sim, demo, token, check-config."""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from gateway.config import HMAC_ALGORITHMS, ConfigError, GatewayConfig, load_config, parse_config

EXIT_CONFIG = 2


def _print_config_error(exc: ConfigError, path: str) -> None:
    print(f"{path}: invalid configuration", file=sys.stderr)
    for problem in exc.problems:
        print(f"  - {problem}", file=sys.stderr)


def _load(path: str) -> GatewayConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        _print_config_error(exc, path)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.path)
    if config is None:
        return 1
    try:
        from gateway.auth.tokens import Authenticator

        Authenticator(config.auth)
    except ConfigError as exc:
        _print_config_error(exc, args.path)
        return 1
    print(f"{args.path}: ok")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    if args.port is not None:
        config = config.model_copy(update={"server": config.server.model_copy(update={"port": args.port})})
    from gateway.logs import configure_logging

    configure_logging(config.logging.level, config.secrets())
    try:
        app = _build_app(config)
    except ConfigError as exc:
        _print_config_error(exc, args.config)
        return EXIT_CONFIG

    import logging

    from gateway import server as srv

    async def main() -> None:
        servers = [srv.make_server(app, config.server.host, config.server.port,
                                   drain_timeout=config.server.drain_timeout,
                                   ws_max_size=srv.frame_limit(config.websocket.max_message_bytes))]
        metrics_app = getattr(app, "metrics_app", None)
        if metrics_app is not None and config.metrics.port is not None:
            servers.append(srv.make_server(metrics_app, config.metrics.host, config.metrics.port))

        def started() -> None:
            ports = {"port": srv.bound_port(servers[0]),
                     "metrics_port": srv.bound_port(servers[1]) if len(servers) > 1 else None}
            logging.getLogger("gateway.cli").info("listening", extra=ports)
            if args.port_file:
                _write_port_file(args.port_file, ports)

        await srv.ServerGroup(servers, on_exit=app.begin_drain).serve(started=started)

    srv.run(main)
    return 0


def _write_port_file(path: str, ports: dict[str, int | None]) -> None:
    """The ports actually bound (port 0 picks one), written atomically so a reader never sees half a file."""
    import os

    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(ports, handle)
    os.replace(tmp, path)


def _build_app(config: GatewayConfig) -> Any:
    from gateway.app import create_app

    return create_app(config)


def cmd_sim(args: argparse.Namespace) -> int:
    from gateway import server as srv
    from gateway.sim import create_sim_app, settings_from_args

    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"gateway sim: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    app = create_sim_app(settings)

    async def main() -> None:
        server = srv.make_server(app, args.host, args.port, drain_timeout=2)
        group = srv.ServerGroup([server])

        def started() -> None:
            print(f"simulator listening on http://{args.host}:{srv.bound_port(server)}", flush=True)
            if args.port_file:
                _write_port_file(args.port_file, {"port": srv.bound_port(server)})

        await group.serve(started=started)

    srv.run(main)
    return 0


def _parse_claims(pairs: Sequence[str]) -> dict[str, Any]:
    claims: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--claim {pair!r}: expected NAME=VALUE")
        try:
            claims[name] = json.loads(value)
        except ValueError:
            claims[name] = value
    return claims


def cmd_token(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    from gateway.auth.tokens import mint_token

    jwt_config = config.auth.jwt
    algorithm = jwt_config.algorithms[0]
    if algorithm not in HMAC_ALGORITHMS:
        if not args.private_key:
            print(f"gateway token: {algorithm} needs --private-key PEM_FILE to sign", file=sys.stderr)
            return EXIT_CONFIG
        with open(args.private_key) as handle:
            key: str = handle.read()
    else:
        key = jwt_config.secret or ""
    try:
        claims = _parse_claims(args.claim)
    except ValueError as exc:
        print(f"gateway token: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    claims.setdefault(jwt_config.streams_claim, ["*/*"])
    if isinstance(jwt_config.audience, str):
        claims.setdefault("aud", jwt_config.audience)
    elif jwt_config.audience:
        claims.setdefault("aud", jwt_config.audience[0])
    if isinstance(jwt_config.issuer, str):
        claims.setdefault("iss", jwt_config.issuer)
    elif jwt_config.issuer:
        claims.setdefault("iss", jwt_config.issuer[0])
    if jwt_config.consumer_claim != "sub":
        claims.setdefault(jwt_config.consumer_claim, args.sub)
    print(mint_token(key, algorithm, args.sub, args.ttl, claims, headers={"kid": args.kid} if args.kid else None))
    return 0


def demo_config(sim_url: str, api_key: str, secret: str, port: int, host: str = "127.0.0.1") -> GatewayConfig:
    """The demo's gateway config: everything on loopback, generated secrets, dashboard on."""
    return parse_config({
        "server": {"host": host, "port": port, "drain_timeout": 3},
        "upstream": {"base_url": sim_url, "api_key": api_key, "backoff_initial": 0.2, "backoff_max": 5},
        "auth": {"jwt": {"algorithms": ["HS256"], "secret": secret}},
        "limits": {"linger": 10},
        "dashboard": {"enabled": True},
    }, env={})


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway import server as srv
    from gateway.auth.tokens import mint_token
    from gateway.logs import configure_logging
    from gateway.sim import SimSettings, create_sim_app

    api_key = "demo-" + secrets.token_urlsafe(24)
    secret = secrets.token_urlsafe(48)
    sim_app = create_sim_app(SimSettings(api_key=api_key, rows=args.rows, interval=args.interval))
    configure_logging("warning", (api_key, secret))

    async def main() -> None:
        sim_server = srv.make_server(sim_app, "127.0.0.1", args.sim_port, drain_timeout=1)
        sim_group = srv.ServerGroup([sim_server])
        import asyncio

        sim_task = asyncio.get_running_loop().create_task(sim_group.serve())
        while not sim_server.started:
            if sim_task.done():
                await sim_task
                return
            await asyncio.sleep(0.02)
        sim_url = f"http://127.0.0.1:{srv.bound_port(sim_server)}"
        config = demo_config(sim_url, api_key, secret, args.port)
        app = _build_app(config)
        gateway_server = srv.make_server(app, "127.0.0.1", args.port, drain_timeout=3)
        tokens = [mint_token(secret, "HS256", user, args.ttl, {"streams": ["*/*"]}) for user in ("alice", "bob")]

        def announce() -> None:
            base = f"http://127.0.0.1:{srv.bound_port(gateway_server)}"
            url = f"{base}/api/v1/evaluations/eval-demo-1/stream"
            curls = "\n".join(f"  curl -N -H {shlex.quote(f'Authorization: Bearer {t}')} {url}" for t in tokens)
            print(f"""
Stratix gateway demo
  simulator (the upstream; only it and the gateway know the API key): {sim_url}
  gateway (what browsers talk to):                                   {base}

Open the dashboard (signed in as alice; the page moves the token from the #fragment into its cookie):
  {base}/#token={tokens[0]}

Dev session tokens (users alice and bob, valid {int(args.ttl)} s):
  alice: {tokens[0]}
  bob:   {tokens[1]}

Stream a live evaluation as two users at once (two terminals); the upstream still sees one stream:
{curls}
(A second stream by the same user replaces the first, as the upstream's one-stream-per-consumer rule does.)

Upstream connections the simulator has seen:
  curl -s {sim_url}/_sim/stats

Ctrl-C to stop.""", flush=True)

        def stop_all() -> None:
            app.begin_drain()
            sim_group.stop()

        try:
            await srv.ServerGroup([gateway_server], on_exit=stop_all).serve(started=announce)
        finally:
            sim_group.stop()
            await sim_task

    with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C
        srv.run(main)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, help="path to gateway.yaml")
    serve.add_argument("--port", type=int, default=None, help="override server.port (0: any free port)")
    serve.add_argument("--port-file", default=None, metavar="PATH",
                       help='once listening, write {"port": P, "metrics_port": M} (JSON) to PATH')
    serve.set_defaults(func=cmd_serve)

    sim = sub.add_parser("sim", help="run the bundled Stratix upstream simulator")
    from gateway.sim import add_sim_arguments

    add_sim_arguments(sim)
    sim.add_argument("--port-file", default=None, metavar="PATH", help='once listening, write {"port": P} to PATH')
    sim.set_defaults(func=cmd_sim)

    demo = sub.add_parser("demo", help="run the simulator and the gateway together on loopback")
    demo.add_argument("--port", type=int, default=8080, help="gateway port (default: %(default)s)")
    demo.add_argument("--sim-port", type=int, default=0, help="simulator port (default: any free port)")
    demo.add_argument("--rows", type=int, default=40, help="rows per simulated evaluation")
    demo.add_argument("--interval", type=float, default=0.5, help="seconds between simulated events")
    demo.add_argument("--ttl", type=float, default=8 * 3600, help="dev token lifetime in seconds")
    demo.set_defaults(func=cmd_demo)

    token = sub.add_parser("token", help="mint a development session token")
    token.add_argument("--config", required=True)
    token.add_argument("--sub", required=True, help="the consumer (sub claim)")
    token.add_argument("--ttl", type=float, default=3600)
    token.add_argument("--claim", action="append", default=[], metavar="K=V",
                       help="extra claim; V is parsed as JSON when it is JSON (repeatable)")
    token.add_argument("--kid", default=None, help="key id header")
    token.add_argument("--private-key", default=None, help="PEM private key for RS*/ES*/PS*/EdDSA configs")
    token.set_defaults(func=cmd_token)

    check = sub.add_parser("check-config", help="validate a config and list every problem")
    check.add_argument("path")
    check.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result

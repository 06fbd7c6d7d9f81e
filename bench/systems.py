"""The systems under test, each started fresh as a child process on a loopback port.

* `gateway`: `python -m gateway serve` with a generated config (auth on, metrics on, limits raised
  only where the benchmark needs more than the defaults: connections per client address).
* `naive`: `bench/naive_app.py` (Starlette + uvicorn, one queue per subscriber).
* `nchan`: Debian nginx-light + libnginx-mod-nchan, one worker, generated config in a temp dir.
* `raw` (optional): `bench/raw_app.py`, raw uvloop protocols without ASGI: a ceiling for Python.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bench import procstat

NCHAN_MODULES = ("/usr/lib/nginx/modules/ngx_nchan_module.so", "/usr/share/nginx/modules/ngx_nchan_module.so")
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nchan_module() -> str | None:
    """The nchan module path, if nginx and the module are installed."""
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        return None
    return next((path for path in NCHAN_MODULES if os.path.exists(path)), None)


@dataclass
class Running:
    """A started system: its port, its process (and nginx's worker) and its temp dir."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    tmp: str
    log: Path
    extra_pids: list[int] = field(default_factory=list)
    #: Processes this system needs and stops with it (Redis for `gateway-redis`).
    companions: list[Running] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid, *self.extra_pids]

    def cpu(self) -> float:
        return sum(procstat.cpu_seconds(pid) for pid in self.pids)

    def rss(self) -> int:
        return sum(procstat.rss_bytes(pid) for pid in self.pids)

    def reset_peak(self) -> bool:
        return all(procstat.reset_peak(pid) for pid in self.pids)

    def peak_rss(self) -> int:
        return sum(procstat.peak_rss_bytes(pid) for pid in self.pids)

    @property
    def main_pid(self) -> int:
        """The process that does the work (nginx: its single worker)."""
        return self.extra_pids[0] if self.extra_pids else self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if self.name != "nchan" else signal.SIGQUIT)
            try:
                self.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            self.proc.stdout and self.proc.stdout.close()  # type: ignore[func-returns-value]
        shutil.rmtree(self.tmp, ignore_errors=True)
        for companion in self.companions:
            companion.stop()

    def tail_log(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _wait_port(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"server did not listen on {port} within {timeout}s")
        time.sleep(0.02)


def _when_ready(running: Running, ready: Callable[[], None]) -> Running:
    """`running` once `ready()` returns; if it raises (the server will not come up), stop what was started."""
    try:
        ready()
    except Exception:
        running.stop()
        raise
    return running


def _spawn(args: list[str], tmp: str, pythonpath: Path = REPO) -> tuple[subprocess.Popen[bytes], Path]:
    log = Path(tmp) / "server.log"
    out = open(log, "wb")  # noqa: SIM115 - the child process owns it from here
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), str(REPO), full_env.get("PYTHONPATH"))
                                             if p)
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=tmp)
    out.close()
    return proc, log


def gateway_config(port: int, upstream: str, api_key: str, secret: str, replay_buffer: int = 2048,
                   redis_url: str | None = None, limits: Mapping[str, float | int] | None = None) -> str:
    """The gateway's YAML for a run; `limits` overrides keys of the `limits` section (the soak's short linger)."""
    broker = f"broker:\n  kind: redis\n  url: {redis_url}\n  key_prefix: 'bench:'\n" if redis_url else ""
    section = {"heartbeat": 30, "replay_buffer": replay_buffer, "linger": 5, **(limits or {})}
    limit_lines = "".join(f"  {key}: {value}\n" for key, value in section.items())
    return broker + f"""\
server:
  host: 127.0.0.1
  port: {port}
  max_connections: 60000
  max_connections_per_ip: 100000
  drain_timeout: 2
upstream:
  base_url: {upstream}
  api_key: {api_key}
auth:
  jwt:
    algorithms: [HS256]
    secret: {secret}
limits:
{limit_lines}logging:
  level: warning
"""


def start_redis() -> Running:
    """A throwaway redis-server on a free loopback port (no persistence)."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
    tmp = tempfile.mkdtemp(prefix="bench-redis-")
    port = free_port()
    proc, log = _spawn(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no"], tmp)
    return _when_ready(Running("redis", port, proc, tmp, log), lambda: _wait_port(proc, port, log))


def start_gateway(upstream: str, api_key: str, secret: str, source: Path = REPO, redis: bool = False,
                  limits: Mapping[str, float | int] | None = None) -> Running:
    """Start the gateway; `source` may point at a private copy of the repository (profiling experiments).

    With `redis`, the gateway runs in shared mode (`broker.kind: redis`) against its own
    redis-server, so every event takes the Redis hop (append, then tail) before fan-out.
    """
    tmp = tempfile.mkdtemp(prefix="bench-gateway-")
    port = free_port()
    redis_server = start_redis() if redis else None
    config = Path(tmp) / "gateway.yaml"
    config.write_text(gateway_config(port, upstream, api_key, secret,
                                     redis_url=f"redis://127.0.0.1:{redis_server.port}/0" if redis_server else None,
                                     limits=limits))
    proc, log = _spawn([sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)],
                       tmp, pythonpath=source)
    running = Running("gateway-redis" if redis else "gateway", port, proc, tmp, log,
                      extra_pids=[redis_server.proc.pid] if redis_server else [],
                      companions=[redis_server] if redis_server else [])

    def ready() -> None:
        _wait_port(proc, port, log)
        _wait_http_ok(port, "/healthz")

    return _when_ready(running, ready)


def _wait_http_ok(port: int, path: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n".encode())
            if sock.recv(64).startswith(b"HTTP/1.1 200"):
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not answer 200 within {timeout}s")
        time.sleep(0.05)


def _start_module(name: str, module: str, upstream: str, api_key: str) -> Running:
    """Start one of the bench's own Python servers (`python -m MODULE --port --upstream --api-key`)."""
    tmp = tempfile.mkdtemp(prefix=f"bench-{name}-")
    port = free_port()
    proc, log = _spawn([sys.executable, "-m", module, "--port", str(port), "--upstream", upstream,
                        "--api-key", api_key], tmp)
    return _when_ready(Running(name, port, proc, tmp, log), lambda: _wait_port(proc, port, log))


def start_naive(upstream: str, api_key: str) -> Running:
    """The naive design (bench/naive_app.py): Starlette, one queue per subscriber."""
    return _start_module("naive", "bench.naive_app", upstream, api_key)


def start_raw(upstream: str, api_key: str) -> Running:
    """The raw uvloop reference (bench/raw_app.py): what the hot path costs without ASGI."""
    return _start_module("raw", "bench.raw_app", upstream, api_key)


NGINX_CONF = """\
load_module {module};
worker_processes 1;
worker_rlimit_nofile {nofile};
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{
    worker_connections {connections};
    multi_accept on;
}}
http {{
    access_log off;
    keepalive_requests 100000000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    nchan_shared_memory_size 256M;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location ~ ^/pub/([A-Za-z0-9._:-]+)$ {{
            nchan_publisher;
            nchan_channel_id $1;
            nchan_message_buffer_length 64;
            nchan_message_timeout 60s;
        }}
        location ~ ^/api/v1/evaluations/([A-Za-z0-9._:-]+)/stream$ {{
            nchan_subscriber eventsource;
            nchan_channel_id $1;
        }}
    }}
}}
"""


def start_nchan(module: str) -> Running:
    tmp = tempfile.mkdtemp(prefix="bench-nchan-")
    port = free_port()
    nofile = procstat.raise_fd_limit()
    conf = Path(tmp) / "nginx.conf"
    conf.write_text(NGINX_CONF.format(module=module, tmp=tmp, port=port, nofile=nofile,
                                      connections=max(1024, nofile - 100)))
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc, log = _spawn([nginx, "-p", tmp, "-c", str(conf), "-e", f"{tmp}/error.log"], tmp)
    running = Running("nchan", port, proc, tmp, Path(tmp) / "error.log")

    def ready() -> None:
        _wait_port(proc, port, log)
        deadline = time.monotonic() + 5
        while not running.extra_pids and time.monotonic() < deadline:
            running.extra_pids = procstat.children(proc.pid)
            time.sleep(0.02)

    return _when_ready(running, ready)


def probe_websocket(port: int, path: str, token: str) -> str:
    """The status line a WebSocket upgrade on `path` gets (404 while the endpoint does not exist)."""
    request = (f"GET {path} HTTP/1.1\r\nhost: bench\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
               f"sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               f"authorization: Bearer {token}\r\n\r\n")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(request.encode())
            return sock.recv(256).split(b"\r\n", 1)[0].decode("latin-1")
    except OSError as exc:
        return f"error: {exc}"

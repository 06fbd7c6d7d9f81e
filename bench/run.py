"""The benchmark's one command: every system, every N, both modes, in one invocation.

    python -m bench --quick     # about a minute: N in {100, 1000}, one repeat
    python -m bench --full      # N in {100, 1000, 5000}, 3 repeats, 10,000 held subscribers (~15 min)
    python -m bench --storm     # reconnect storm (bench/storm.py; its own options: --storm --help)
    python -m bench --soak      # soak with churn (bench/soak.py; its own options: --soak --help)

For each run the system under test is started fresh; the load generator opens N subscribers
(memory is read before and after), then the publisher drives one stream either closed-loop
(message k is sent once message k-W reached every subscriber: maximum throughput) or at a fixed
total delivery rate (latency). Results: `bench/results/latest.json`, `latest.md`, `fanout.png`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import procstat
from bench import systems as sut
from bench.loadgen import LoadGen, Merged, Target

RESULTS = Path(__file__).resolve().parent / "results"
SYSTEMS = ("gateway", "naive", "nchan")
OPTIONAL_SYSTEMS = ("raw", "gateway-redis")


@dataclass
class Options:
    """What one invocation measures (see `QUICK` and `FULL`)."""

    ns: list[int] = field(default_factory=lambda: [100, 1000])
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    transports: list[str] = field(default_factory=lambda: ["sse", "ws"])
    repeats: int = 1
    workers: int = 1
    window: int = 16
    deliveries: int = 300_000  # per closed-loop run (fewer if `duration` is reached first)
    duration: float = 4.0  # cap on one closed-loop run's publication, seconds
    rate: float = 20_000.0  # deliveries per second in fixed-rate runs
    rate_ns: list[int] = field(default_factory=lambda: [1000])
    rate_duration: float = 4.0
    hold: int = 0  # subscribers held idle in the memory/holding run (0: skip)
    #: Pin the system under test to the first CPU and the load generator to the others while
    #: publishing, so the scheduler cannot put the woken load generator on the server's core.
    pin: bool = True
    out: Path = RESULTS
    plot: bool = True
    gateway_source: Path = sut.REPO
    profile: str | None = None  # py-spy output (.svg flame graph, or .txt collapsed stacks) of one gateway run
    profile_mode: str = "closed"  # which run: the gateway's SSE run at the largest N in this mode

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        data["gateway_source"] = str(self.gateway_source)
        return data


QUICK = Options(deliveries=1_000_000, duration=3.0, rate_duration=3.0)
FULL = Options(ns=[100, 1000, 5000], repeats=3, deliveries=3_000_000, duration=5.0, rate_ns=[100, 1000, 5000],
               rate_duration=5.0, hold=10_000)
SMOKE = Options(ns=[20], systems=["gateway"], transports=["sse"], deliveries=4000, duration=2.0, rate_ns=[],
                plot=False)


class Publisher:
    """A blocking client of the upstream process's control socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.file = self.sock.makefile("rb")

    def call(self, cmd: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        self.sock.settimeout(timeout)
        self.sock.sendall(json.dumps(cmd).encode() + b"\n")
        line = self.file.readline()
        if not line:
            raise RuntimeError("the publisher closed its control socket")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"publisher: {reply['error']}")
        return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class Bench:
    """Owns the upstream/publisher process and the load generator for one invocation."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.api_key = "bench_" + secrets.token_hex(12)
        self.secret = secrets.token_hex(32)
        self.runs = itertools.count(1)
        procstat.raise_fd_limit()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(sut.REPO),
                                                                       os.environ.get("PYTHONPATH")])))
        self.upstream = subprocess.Popen(
            [sys.executable, "-m", "bench.upstream", "--api-key", self.api_key], stdout=subprocess.PIPE, env=env)
        assert self.upstream.stdout is not None
        ready = self.upstream.stdout.readline().split()
        if not ready or ready[0] != b"READY":
            self.upstream.kill()
            raise RuntimeError("the benchmark upstream did not start")
        self.upstream_port, control_port = int(ready[1]), int(ready[2])
        self.upstream_url = f"http://127.0.0.1:{self.upstream_port}"
        self.publisher = Publisher(control_port)
        self.loadgen = LoadGen(options.workers, ("127.0.0.1", control_port))
        self.nchan = sut.nchan_module()
        self.ws_status: str | None = None

    def close(self) -> None:
        self.loadgen.shutdown()
        self.publisher.close()
        self.upstream.terminate()
        self.upstream.wait(timeout=5)

    # --- one run -------------------------------------------------------------------------

    def start(self, system: str) -> sut.Running:
        if system in ("gateway", "gateway-redis"):
            return sut.start_gateway(self.upstream_url, self.api_key, self.secret, self.options.gateway_source,
                                     redis=system == "gateway-redis")
        if system == "naive":
            return sut.start_naive(self.upstream_url, self.api_key)
        if system == "nchan":
            assert self.nchan is not None
            return sut.start_nchan(self.nchan)
        if system == "raw":
            return sut.start_raw(self.upstream_url, self.api_key)
        raise ValueError(system)

    def target(self, system: str, transport: str, port: int, stream: str) -> Target:
        if transport == "ws":
            return Target("127.0.0.1", port, "ws", "/ws", f"evaluations/{stream}", self.secret)
        return Target("127.0.0.1", port, "sse", f"/api/v1/evaluations/{stream}/stream", f"evaluations/{stream}",
                      self.secret if system.startswith("gateway") else None)

    def publish(self, system: str, port: int, stream: str, run: str, mode: str, count: int, duration: float,
                rate: float = 0.0) -> dict[str, Any]:
        cmd: dict[str, Any] = {"cmd": "run", "stream": stream, "run": run, "workers": self.options.workers,
                               "mode": mode, "window": self.options.window, "count": count, "duration": duration,
                               "rate": rate, "drain_timeout": 20.0}
        if system == "nchan":
            cmd.update(sink="nchan", nchan_host="127.0.0.1", nchan_port=port)
        return self.publisher.call(cmd, timeout=duration + 60)

    def wait_upstream(self, system: str, stream: str, timeout: float = 10.0) -> int:
        if system == "nchan":
            return 0
        deadline = time.monotonic() + timeout
        while True:
            opened = int(self.publisher.call({"cmd": "stats", "stream": stream})["opened"])
            if opened or time.monotonic() > deadline:
                return opened
            time.sleep(0.02)

    def run(self, system: str, transport: str, n: int, mode: str, repeat: int) -> dict[str, Any]:
        """Start `system`, connect `n` subscribers, publish, measure, stop."""
        label = f"{system}/{transport} N={n} {mode} #{repeat + 1}"
        print(f"  {label} ...", end="", flush=True)
        result: dict[str, Any] = {"system": system, "transport": transport, "n": n, "mode": mode,
                                  "repeat": repeat, "problems": []}
        problems: list[str] = result["problems"]
        server = self.start(system)
        try:
            self._measure(server, system, transport, n, mode, result, problems)
        except Exception as exc:
            problems.append(f"run failed: {exc!r}")
            tail = server.tail_log()
            if tail:
                problems.append("server log: " + tail[-1500:])
        finally:
            with contextlib.suppress(Exception):
                self.loadgen.close()
            server.stop()
        result["ok"] = not problems
        if "deliveries_per_s" in result:
            print(f" {result['deliveries_per_s']:>9,.0f} deliveries/s  p50 {result['p50_ms']:.1f} ms"
                  f"  p99 {result['p99_ms']:.1f} ms  {result['per_sub_bytes'] / 1024:.1f} KB/sub"
                  f"{'' if result['ok'] else '  PROBLEMS: ' + '; '.join(problems)[:300]}", flush=True)
        else:
            print(" FAILED: " + "; ".join(problems)[:500], flush=True)
        return result

    def _measure(self, server: sut.Running, system: str, transport: str, n: int, mode: str,
                 result: dict[str, Any], problems: list[str]) -> None:
        opts = self.options
        run_no = next(self.runs)
        # Warm-up: one subscriber, a few messages, so one-off costs (imports, the upstream client,
        # first allocations) are not counted as per-subscriber memory.
        warm = f"warm{run_no}-{secrets.token_hex(3)}"
        self.loadgen.connect(self.target(system, transport, server.port, warm), 1, f"w{run_no}")
        self.wait_upstream(system, warm)
        self.loadgen.start(f"w{run_no}", 20)
        self.publish(system, server.port, warm, f"w{run_no}", "closed", 20, 10.0)
        self.loadgen.close()
        time.sleep(0.3)
        result["rss_base"] = rss_base = server.rss()

        stream = f"run{run_no}-{secrets.token_hex(3)}"
        run = f"r{run_no}"
        connected = self.loadgen.connect(self.target(system, transport, server.port, stream), n, run)
        result["connect_s"] = round(connected["seconds"], 3)
        result["statuses"] = connected["statuses"]
        if connected["statuses"].get("ok", 0) != n:
            problems.append(f"only {connected['statuses'].get('ok', 0)} of {n} subscribed: {connected['statuses']}")
        if self.wait_upstream(system, stream) < 1 and system != "nchan":
            problems.append("the upstream saw no connection")
        time.sleep(0.5 if n < 5000 else 1.0)
        result["rss_idle"] = rss_idle = server.rss()
        result["per_sub_bytes"] = (rss_idle - rss_base) / n

        if mode == "closed":
            count = max(opts.window * 2, math.ceil(opts.deliveries / n))
            duration = opts.duration
            rate = 0.0
        elif mode == "rate":
            rate = opts.rate / n
            duration = opts.rate_duration
            count = max(1, int(rate * duration))
        else:  # hold: a few messages prove every held subscriber is alive
            count, duration, rate = 5, 30.0, 0.0
        result["pinned"] = self._pin(server)
        self.loadgen.start(run, count)
        peak_ok = server.reset_peak()
        cpu0 = server.cpu()
        lg0 = sum(procstat.cpu_seconds(pid) for pid in self.loadgen.pids)
        pub0 = procstat.cpu_seconds(self.upstream.pid)
        profiler = self._profiler(server, system, transport, n, mode, duration)
        answer = self.publish(system, server.port, stream, run, "rate" if mode == "rate" else "closed", count,
                              duration, rate)
        cpu1 = server.cpu()
        lg1 = sum(procstat.cpu_seconds(pid) for pid in self.loadgen.pids)
        pub1 = procstat.cpu_seconds(self.upstream.pid)
        result["rss_peak"] = server.peak_rss() if peak_ok else max(rss_idle, server.rss())
        if profiler is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                profiler.wait(timeout=30)
        stats = Merged.of(self.loadgen.stats())
        published = int(answer["published"])
        seconds = max(1e-9, (answer["done_ns"] - answer["first_ns"]) / 1e9) if answer["done_ns"] else float("nan")
        result.update({
            "published": published, "deliveries": stats.deliveries, "seconds": round(seconds, 4),
            "deliveries_per_s": stats.deliveries / seconds if answer["done_ns"] else 0.0,
            "p50_ms": stats.percentile(50), "p90_ms": stats.percentile(90), "p99_ms": stats.percentile(99),
            "max_ms": stats.max_ns / 1e6, "server_cpu_s": round(cpu1 - cpu0, 3),
            "loadgen_cpu_s": round(lg1 - lg0, 3), "publisher_cpu_s": round(pub1 - pub0, 3),
            "upstream_connections": (int(self.publisher.call({"cmd": "stats", "stream": stream})["opened"])
                                     if system != "nchan" else None),
        })
        if mode == "rate":
            result["target_rate"] = opts.rate
        result["server_us_per_delivery"] = 1e6 * result["server_cpu_s"] / max(1, stats.deliveries)
        result["loadgen_us_per_delivery"] = 1e6 * result["loadgen_cpu_s"] / max(1, stats.deliveries)
        if answer.get("publish_statuses"):
            result["publish_statuses"] = answer["publish_statuses"]
        # Exactly once, in order: no sequence violation anywhere, every subscriber ends on the last
        # message, and the total is N x published.
        exact = (stats.violations == 0 and stats.deliveries == n * published
                 and dict(stats.last_seq_counts) == {published: n} and stats.lost == 0)
        result["exactly_once_in_order"] = exact
        if answer["timed_out"]:
            problems.append(f"publication did not complete (acks {answer['acks']})")
        if not exact:
            problems.append(f"exactly-once check failed: {stats.violations} order violations "
                            f"{stats.violation_samples[:3]}, {stats.deliveries} of {n * published} deliveries, "
                            f"last seqs {dict(stats.last_seq_counts.most_common(4))}, {stats.lost} lost, "
                            f"notes {dict(stats.close_notes)}")
        if system != "nchan" and result["upstream_connections"] != 1:
            problems.append(f"{result['upstream_connections']} upstream connections (must be 1)")

    def _pin(self, server: sut.Running) -> bool:
        """Server on the first CPU, load generator on the rest (see `Options.pin`); False if not done."""
        cpus = sorted(os.sched_getaffinity(0))
        if not self.options.pin or len(cpus) < 2:
            return False
        return procstat.pin(server.pids, {cpus[0]}) and procstat.pin(self.loadgen.pids, set(cpus[1:]))

    def _profiler(self, server: sut.Running, system: str, transport: str, n: int, mode: str,
                  duration: float) -> subprocess.Popen[bytes] | None:
        opts = self.options
        largest = max(opts.rate_ns if mode == "rate" else [opts.hold] if mode == "hold" else opts.ns)
        if (opts.profile is None or system != "gateway" or transport != opts.transports[0]
                or mode != opts.profile_mode or n != largest):
            return None
        path, opts.profile = opts.profile, None  # once
        fmt = "raw" if path.endswith(".txt") else "flamegraph"
        # py-spy is a pip package: next to this interpreter when the venv is not on PATH.
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        return subprocess.Popen([spy, "record", "--pid", str(server.main_pid), "--output", path, "--format", fmt,
                                 "--duration", str(max(1, int(duration))), "--rate", "250", "--nonblocking"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # --- the whole matrix ------------------------------------------------------------------

    def matrix(self) -> list[dict[str, Any]]:
        opts = self.options
        combos: list[tuple[str, str]] = []
        for system in opts.systems:
            if system == "nchan" and self.nchan is None:
                print("nchan: not installed (apt-get install -y nginx-light libnginx-mod-nchan); skipped")
                continue
            if system == "gateway":
                combos += [("gateway", t) for t in opts.transports if t == "sse" or self.websocket_available()]
            else:
                combos.append((system, "sse"))
        results: list[dict[str, Any]] = []
        # Repeats are interleaved across systems so a noisy minute hurts every system alike.
        for repeat in range(opts.repeats):
            print(f"repeat {repeat + 1}/{opts.repeats}")
            for n in opts.ns:
                for system, transport in combos:
                    results.append(self.run(system, transport, n, "closed", repeat))
            for n in opts.rate_ns:
                for system, transport in combos:
                    results.append(self.run(system, transport, n, "rate", repeat))
        if opts.hold:
            print(f"holding {opts.hold} idle subscribers")
            for system, transport in combos:
                results.append(self.run(system, transport, opts.hold, "hold", 0))
        return results

    def websocket_available(self) -> bool:
        if self.ws_status is None:
            server = self.start("gateway")
            try:
                from bench.internals import mint_token

                token = mint_token(self.secret, "HS256", "bench-probe", 60, {"streams": ["*/*"]})
                self.ws_status = sut.probe_websocket(server.port, "/ws", token)
            finally:
                server.stop()
            if " 101 " not in self.ws_status + " ":
                print(f"gateway WebSocket: n/a ({self.ws_status})")
        return " 101 " in self.ws_status + " "


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over repeats, per (system, transport, N, mode)."""
    groups: dict[tuple[str, str, int, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["system"], r["transport"], r["n"], r["mode"]), []).append(r)
    keys = ("deliveries_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms", "rss_base", "rss_idle", "rss_peak",
            "per_sub_bytes", "server_cpu_s", "loadgen_cpu_s", "server_us_per_delivery", "loadgen_us_per_delivery",
            "connect_s", "seconds", "deliveries")
    summary = []
    for (system, transport, n, mode), runs in sorted(groups.items(), key=lambda kv: (kv[0][3], kv[0][2], kv[0][:2])):
        good = [r for r in runs if "deliveries_per_s" in r]
        row: dict[str, Any] = {"system": system, "transport": transport, "n": n, "mode": mode, "runs": len(runs)}
        for key in keys:
            values = [r[key] for r in good if isinstance(r.get(key), int | float) and not math.isnan(r[key])]
            row[key] = statistics.median(values) if values else None
        conns = {r.get("upstream_connections") for r in runs}
        row["upstream_connections"] = (max(c for c in conns if c is not None)
                                       if any(c is not None for c in conns) else None)
        row["exactly_once_in_order"] = all(r.get("exactly_once_in_order") for r in runs)
        row["ok"] = all(r.get("ok") for r in runs)
        summary.append(row)
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The other two modes have options of their own (`python -m bench --storm --help`).
    if "--storm" in argv:
        from bench.storm import main as storm

        return storm([a for a in argv if a != "--storm"])
    if "--soak" in argv:
        from bench.soak import main as soak

        return soak([a for a in argv if a != "--soak"])
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="about a minute (default)")
    size.add_argument("--full", action="store_true", help="N in {100, 1000, 5000}, 3 repeats, 10k held (~15 min)")
    parser.add_argument("--n", help="comma-separated subscriber counts (overrides the preset)")
    parser.add_argument("--systems", help=f"comma-separated, from {','.join(SYSTEMS + OPTIONAL_SYSTEMS)} "
                        f"(default {','.join(SYSTEMS)})")
    parser.add_argument("--transports", help="gateway transports: sse,ws")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--workers", type=int, help="load generator processes (default 1)")
    parser.add_argument("--window", type=int, help="messages in flight in closed loop (default 16)")
    parser.add_argument("--rate", type=float, help="total deliveries/s in fixed-rate runs (default 20000)")
    parser.add_argument("--rate-n", help="comma-separated N for fixed-rate runs ('' for none)")
    parser.add_argument("--deliveries", type=int, help="deliveries per closed-loop run")
    parser.add_argument("--duration", type=float, help="cap on one closed-loop run, seconds")
    parser.add_argument("--hold", type=int, help="idle subscribers in the holding run (0: skip)")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-pin", action="store_true", help="let the scheduler place the server and the load "
                        "generator (default: server on the first CPU, load generator on the others)")
    parser.add_argument("--gateway-source", type=Path, help="run the gateway from another checkout")
    parser.add_argument("--profile", help="py-spy output (.svg flame graph or .txt collapsed stacks) of the "
                        "gateway's run at the largest N of --profile-mode, first of --transports")
    parser.add_argument("--profile-mode", choices=("closed", "rate", "hold"), help="default closed")
    args = parser.parse_args(argv)

    options = replace(FULL if args.full else QUICK)
    overrides: dict[str, Any] = {
        "ns": _ints(args.n), "systems": args.systems and args.systems.split(","),
        "transports": args.transports and args.transports.split(","), "repeats": args.repeats,
        "workers": args.workers, "window": args.window, "rate": args.rate, "deliveries": args.deliveries,
        "duration": args.duration, "hold": args.hold, "out": args.out, "gateway_source": args.gateway_source,
        "profile": args.profile, "profile_mode": args.profile_mode,
        "rate_ns": _ints(args.rate_n) if args.rate_n is not None else None,
    }
    options = replace(options, **{k: v for k, v in overrides.items() if v is not None})
    if args.no_plot:
        options.plot = False
    if args.no_pin:
        options.pin = False
    if args.n is not None and args.rate_n is None:
        options.rate_ns = [n for n in options.rate_ns if n in options.ns] or options.ns[-1:]
    document = run_bench(options)
    return 0 if all(r["ok"] for r in document["summary"]) else 1


def _revision(source: Path) -> str:
    """The commit the gateway ran from, with "+dirty" if its files had uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--", "gateway"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def _ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    return [int(x) for x in text.split(",") if x.strip()]


def run_bench(options: Options, write: bool = True) -> dict[str, Any]:
    """Run the matrix; write `latest.json`/`latest.md`/`fanout.png` under `options.out` if `write`."""
    started = time.time()
    bench = Bench(options)
    try:
        print(f"upstream/publisher on :{bench.upstream_port}; {options.workers} load generator process(es); "
              f"nchan: {bench.nchan or 'not installed'}")
        results = bench.matrix()
        ws_status = bench.ws_status
    finally:
        bench.close()
    document = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "gateway_revision": _revision(options.gateway_source),
        "options": options.public(), "websocket": ws_status, "runs": results, "summary": summarize(results),
    }
    if write:
        from bench import report

        options.out.mkdir(parents=True, exist_ok=True)
        (options.out / "latest.json").write_text(json.dumps(document, indent=1, default=str))
        markdown = report.markdown(document)
        (options.out / "latest.md").write_text(markdown)
        if options.plot:
            report.plot(document, options.out / "fanout.png")
        print(markdown)
    return document


if __name__ == "__main__":
    sys.exit(main())

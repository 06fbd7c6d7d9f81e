"""The reconnect storm: N subscribers drop at once and come back at once with `Last-Event-ID`.

    python -m bench --storm                 # N=10,000; gateway, nchan and the naive app, one after another
    python -m bench --storm --n 1000 --systems gateway --profile /tmp/storm.txt

For each system, started fresh: N SSE subscribers with distinct tokens (distinct `sub`)
connect to one evaluation (200 at a time: the "cold" connect), the upstream publishes
`--events-per-s` events per second, and once every subscriber has an event id the load
generator drops every connection at once (RST) and reconnects every one at once, each with
the id of the last event it received. Measured per system: the time from the drop until
every subscriber has its response head (admitted) and until every one has received the next
event (resumed), admissions per second, admission latency (connect start to response head),
whether each resume continued the sequence without a gap or a duplicate, and the server's CPU.
Results: `bench/results/storm.json` and `storm.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import procstat
from bench import systems as sut
from bench.run import RESULTS, Bench, Options, _revision

SYSTEMS = ("gateway", "nchan", "naive")
PATH = "/api/v1/evaluations/{stream}/stream"
LABELS = {"gateway": "gateway", "nchan": "nchan", "naive": "naive Python", "raw": "raw uvloop"}


@dataclass
class StormOptions:
    """What one storm invocation measures."""

    n: int = 10_000
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    #: Events per second on the evaluation while the storm runs: "the next event" comes within 1/rate.
    events_per_s: float = 5.0
    timeout: float = 60.0  # longest wait for every subscriber to resume
    workers: int = 1
    pin: bool = True
    target_s: float = 3.0  # every subscriber resumed within this (issue 18)
    out: Path = RESULTS
    gateway_source: Path = sut.REPO
    profile: str | None = None  # py-spy output of the gateway during the reconnect (.svg, or .txt: collapsed)
    profile_rate: int = 1000

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        data["gateway_source"] = str(self.gateway_source)
        return data


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of `values`, or None if there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[rank]


def _merge_storm(replies: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {
        "seats": sum(r["seats"] for r in replies), "resumed": sum(r["resumed"] for r in replies),
        "no_gap": sum(r["no_gap"] for r in replies), "dropped": min(r["dropped"] for r in replies),
        "reconnected": max(r["reconnected"] for r in replies),
        "first_start": min(r["first_start"] for r in replies), "last_head": max(r["last_head"] for r in replies),
        "last_first": max(r["last_first"] for r in replies),
        "admission_ms": [x for r in replies for x in r["admission_ms"]],
        "resume_ms": [x for r in replies for x in r["resume_ms"]],
    }
    statuses: Counter[str] = Counter()
    for r in replies:
        statuses.update(r["statuses"])
    merged["statuses"] = dict(statuses)
    return merged


class Profiler:
    """py-spy recording one process, started and stopped around a phase."""

    def __init__(self, pid: int, path: str, rate: int, limit_s: float) -> None:
        self.path = path
        fmt = "raw" if path.endswith(".txt") else "flamegraph"
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--output", path, "--format", fmt,
                                      "--rate", str(rate), "--duration", str(max(1, int(limit_s))),
                                      "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # py-spy says "Sampling process ..." once it is attached: wait for that, not for a guess.
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 10
        seen = b""
        while b"Sampling" not in seen and time.monotonic() < deadline and self.proc.poll() is None:
            ready, _, _ = select.select([self.proc.stderr], [], [], 0.1)
            if ready:
                seen += os.read(self.proc.stderr.fileno(), 4096)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


_LINE = re.compile(r":\d+\)$")
#: Where an admission's time goes, from the request to the first bytes of the stream (inclusive shares).
PHASES = ("HttpToolsProtocol.data_received", "SSEStreams._handle", "Admission.admit", "Authenticator.authenticate",
          "Hub.subscribe", "_Stream.run", "DirectHttpProtocol.detach", "_Stream.flush", "Topic.flush",
          "_Detached.write")


def _stacks(collapsed: Path) -> list[tuple[list[str], int]]:
    """(frames outermost first, without line numbers; samples) per line of a py-spy collapsed-stack file."""
    stacks = []
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append(([_LINE.sub(")", frame) for frame in stack.split(";")], int(count)))
    return stacks


def top_self(collapsed: Path, limit: int = 15) -> list[tuple[str, float]]:
    """The functions with the most self time in a py-spy collapsed-stack file: (function, share of samples)."""
    counts: Counter[str] = Counter()
    stacks = _stacks(collapsed)
    total = sum(n for _, n in stacks)
    for frames, n in stacks:
        counts[frames[-1]] += n
    return [(frame, n / total) for frame, n in counts.most_common(limit)] if total else []


def inclusive(collapsed: Path, names: tuple[str, ...] = PHASES) -> list[tuple[str, float]]:
    """The share of samples with each of `names` (function names, `Class.method`) anywhere on the stack."""
    stacks = _stacks(collapsed)
    total = sum(n for _, n in stacks)
    shares = []
    for name in names:
        hits = sum(n for frames, n in stacks if any(f.startswith(name + " (") for f in frames))
        shares.append((name, hits / total if total else 0.0))
    return shares


class Storm:
    """Runs the storm against each system with one upstream/publisher and one load generator."""

    def __init__(self, options: StormOptions) -> None:
        self.options = options
        self.bench = Bench(Options(workers=options.workers, gateway_source=options.gateway_source))
        self.runs = 0

    def close(self) -> None:
        self.bench.close()

    def run(self, system: str) -> dict[str, Any]:
        opts = self.options
        self.runs += 1
        result: dict[str, Any] = {"system": system, "n": opts.n, "problems": []}
        problems: list[str] = result["problems"]
        print(f"  {system} N={opts.n} ...", end="", flush=True)
        server = self.bench.start(system)
        stream = f"storm{self.runs}-{secrets.token_hex(3)}"
        try:
            self._measure(server, system, stream, result, problems)
        except Exception as exc:
            problems.append(f"run failed: {exc!r}")
            tail = server.tail_log()
            if tail:
                problems.append("server log: " + tail[-1500:])
        finally:
            with contextlib.suppress(Exception):
                self.bench.publisher.call({"cmd": "halt"})
            with contextlib.suppress(Exception):
                self.bench.loadgen.churn("close")
            server.stop()
        result["ok"] = not problems
        if "admissions_per_s" in result:
            print(f" all resumed in {_fmt(result['all_resumed_s'], '.2f')} s, "
                  f"{_fmt(result['admissions_per_s'])} admissions/s, p99 admission "
                  f"{_fmt(result['admission_p99_ms'], '.0f')} ms, no gap {result['no_gap']}/{result['seats']}"
                  f"{'' if result['ok'] else '  PROBLEMS: ' + '; '.join(problems)[:300]}", flush=True)
        else:
            print(" FAILED: " + "; ".join(problems)[:500], flush=True)
        return result

    def _measure(self, server: sut.Running, system: str, stream: str, result: dict[str, Any],
                 problems: list[str]) -> None:
        opts = self.options
        bench = self.bench
        n = opts.n
        secret = bench.secret if system.startswith("gateway") else None
        replies = bench.loadgen.churn_connect(n, host="127.0.0.1", port=server.port, path=PATH, streams=[stream],
                                              secret=secret, run=f"s{self.runs}", concurrency=200)
        cold: Counter[str] = Counter()
        for reply in replies:
            cold.update(reply["statuses"])
        cold_ms = [x for r in replies for x in r["admission_ms"]]
        cold_s = max(r["seconds"] for r in replies)
        result.update({"cold_statuses": dict(cold), "cold_s": round(cold_s, 3),
                       "cold_admissions_per_s": cold.get("ok", 0) / cold_s if cold_s else None,
                       "cold_admission_p99_ms": percentile(cold_ms, 99)})
        if cold.get("ok", 0) != n:
            problems.append(f"only {cold.get('ok', 0)} of {n} subscribed: {dict(cold)}")
            return
        result["pinned"] = self._pin(server)
        sink = {"sink": "nchan", "nchan_host": "127.0.0.1", "nchan_port": server.port} if system == "nchan" else {}
        bench.publisher.call({"cmd": "begin", "stream": stream, "rate": opts.events_per_s, **sink})
        settled = sum(r["settled"] for r in bench.loadgen.churn("settle", wait=60, timeout=30))
        if settled != n:
            problems.append(f"only {settled} of {n} subscribers received an event before the storm")
            return
        rss0 = server.rss()
        server.reset_peak()
        profiler = None
        if opts.profile and system == "gateway":
            profiler = Profiler(server.main_pid, opts.profile, opts.profile_rate, opts.timeout + 10)
        cpu0 = server.cpu()
        lg0 = sum(procstat.cpu_seconds(pid) for pid in bench.loadgen.pids)
        tcp0 = procstat.tcp_counters()
        try:
            storm = _merge_storm(bench.loadgen.churn("storm", wait=opts.timeout + 60, timeout=opts.timeout))
        finally:
            cpu1 = server.cpu()
            if profiler is not None:
                profiler.stop()
                result["profile"] = opts.profile
                opts.profile = None  # once
        lg1 = sum(procstat.cpu_seconds(pid) for pid in bench.loadgen.pids)
        tcp1 = procstat.tcp_counters()
        # System-wide, so other traffic counts too; on a quiet machine it is the storm's.
        result["tcp"] = {name: tcp1[name] - tcp0.get(name, 0) for name in tcp1}
        published = bench.publisher.call({"cmd": "halt"})["published"].get(stream)
        seats = storm["seats"]
        admitted = storm["statuses"].get("ok", 0)
        span = storm["last_head"] - storm["first_start"]
        result.update({
            "seats": seats, "admitted": admitted, "resumed": storm["resumed"], "no_gap": storm["no_gap"],
            "statuses": storm["statuses"],
            "drop_s": storm["reconnected"] - storm["dropped"],
            "all_admitted_s": storm["last_head"] - storm["reconnected"] if admitted else None,
            "all_resumed_s": storm["last_first"] - storm["reconnected"] if storm["resumed"] == seats else None,
            "admissions_per_s": admitted / span if admitted and span > 0 else 0.0,
            "admission_p50_ms": percentile(storm["admission_ms"], 50),
            "admission_p99_ms": percentile(storm["admission_ms"], 99),
            "admission_max_ms": max(storm["admission_ms"], default=None),
            "resume_p50_ms": percentile(storm["resume_ms"], 50),
            "resume_p99_ms": percentile(storm["resume_ms"], 99),
            "server_cpu_s": round(cpu1 - cpu0, 3), "loadgen_cpu_s": round(lg1 - lg0, 3),
            "server_us_per_admission": 1e6 * (cpu1 - cpu0) / admitted if admitted else None,
            "rss_before": rss0, "rss_peak": server.peak_rss(), "published": published,
        })
        if system != "nchan":
            opened = bench.publisher.call({"cmd": "upstream", "streams": [stream]})["opened"][stream]
            result["upstream_connections"] = opened
            if opened != 1:
                problems.append(f"{opened} upstream connections for the evaluation (must be 1)")
        stats = bench.loadgen.churn("stats")
        result["violations"] = sum(s["violations"] for s in stats)
        result["violation_samples"] = [x for s in stats for x in s["violation_samples"]][:5]
        if admitted != seats:
            problems.append(f"{seats - admitted} of {seats} reconnects refused or failed: {storm['statuses']}")
        elif storm["resumed"] != seats:
            problems.append(f"only {storm['resumed']} of {seats} received an event within {opts.timeout:.0f} s")
        if system == "gateway" and storm["no_gap"] != storm["resumed"]:
            problems.append(f"{storm['resumed'] - storm['no_gap']} resumes with a gap or a duplicate: "
                            f"{result['violation_samples'][:3]}")

    def _pin(self, server: sut.Running) -> bool:
        cpus = sorted(os.sched_getaffinity(0))
        if not self.options.pin or len(cpus) < 2:
            return False
        return procstat.pin(server.pids, {cpus[0]}) and procstat.pin(self.bench.loadgen.pids, set(cpus[1:]))


def targets(runs: list[dict[str, Any]], target_s: float) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for issue 18's storm targets."""
    by = {r["system"]: r for r in runs}
    gateway, nchan = by.get("gateway"), by.get("nchan")
    out: list[tuple[str, str, bool | None]] = []
    if gateway is not None:
        resumed = gateway.get("all_resumed_s")
        out.append((f"all {gateway['n']:,} resumed within {target_s:g} s on one core",
                    f"{resumed:.2f} s" if resumed is not None else
                    f"not all resumed ({gateway.get('resumed', 0):,} of {gateway['n']:,})",
                    None if resumed is None and not gateway.get("seats") else
                    resumed is not None and resumed <= target_s))
        if nchan is not None:
            g, c = gateway.get("admissions_per_s"), nchan.get("admissions_per_s")
            out.append(("gateway admissions/s >= nchan's (same run)",
                        f"{g or 0:,.0f} vs {c or 0:,.0f}/s" + (f" = {g / c:.2f}x" if g and c else ""),
                        None if not g or not c else g >= c))
        out.append(("every gateway resume continued the sequence (no gap, no duplicate)",
                    f"{gateway.get('no_gap', 0):,} of {gateway.get('seats', 0):,}",
                    bool(gateway.get("seats")) and gateway.get("no_gap") == gateway.get("seats")))
    return out


def _fmt(value: Any, fmt: str = ",.0f", suffix: str = "") -> str:
    if value is None:
        return "n/a"
    return format(value, fmt) + suffix


def markdown(document: dict[str, Any]) -> str:
    opts = document["options"]
    runs = document["runs"]
    machine = document["machine"]
    lines = [
        f"# Reconnect storm, {document['started']}",
        "",
        f"{machine['cpus']} CPUs, Python {machine['python']}, kernel {machine['kernel']}; loopback; N={opts['n']:,} "
        f"SSE subscribers with distinct tokens on one evaluation, {opts['events_per_s']:g} events/s; all dropped "
        "(RST) and reconnected at once with `Last-Event-ID`; "
        + ("server pinned to one CPU, load generator to the other; " if opts["pin"] else "")
        + f"gateway at {document['gateway_revision']}; elapsed {document['elapsed_s']:.0f} s.",
        "",
        "## Targets (issue 18)",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for name, measured, met in targets(runs, opts["target_s"]):
        lines.append(f"| {name} | {measured} | {'n/a' if met is None else ('**met**' if met else '**not met**')} |")
    rows: list[tuple[str, Any]] = [
        ("all resumed (reconnect → every subscriber has the next event), s",
         lambda r: _fmt(r.get("all_resumed_s"), ".2f")),
        ("all admitted (reconnect → every response head), s", lambda r: _fmt(r.get("all_admitted_s"), ".2f")),
        ("admissions/s (reconnect storm)", lambda r: _fmt(r.get("admissions_per_s"))),
        ("admission latency p50 / p99 / max, ms", lambda r: " / ".join(
            _fmt(r.get(k), ".1f") for k in ("admission_p50_ms", "admission_p99_ms", "admission_max_ms"))),
        ("reconnect → next event p50 / p99, ms", lambda r: " / ".join(
            _fmt(r.get(k), ".0f") for k in ("resume_p50_ms", "resume_p99_ms"))),
        ("resumed without a gap or duplicate", lambda r: f"{_fmt(r.get('no_gap'))} of {_fmt(r.get('seats'))}"),
        ("refused or failed reconnects", lambda r: _fmt((r.get("seats") or 0) - (r.get("admitted") or 0))),
        ("drop (N sockets closed by the load generator) before the reconnect, ms",
         lambda r: _fmt(r.get("drop_s") and 1000 * r["drop_s"], ".0f")),
        ("listen-queue overflows / SYN retransmissions (kernel, system-wide)", lambda r: " / ".join(
            _fmt((r.get("tcp") or {}).get(k)) for k in ("ListenOverflows", "TCPSynRetrans"))),
        ("server CPU during the storm, s (µs per admission)", lambda r: f"{_fmt(r.get('server_cpu_s'), '.2f')} "
         f"({_fmt(r.get('server_us_per_admission'), '.0f')})"),
        ("server RSS before / peak, MB", lambda r: f"{_fmt(r.get('rss_before') and r['rss_before'] / 2**20, '.0f')}"
         f" / {_fmt(r.get('rss_peak') and r['rss_peak'] / 2**20, '.0f')}"),
        ("cold connect (200 at a time): admissions/s, p99 ms", lambda r: f"{_fmt(r.get('cold_admissions_per_s'))}, "
         f"{_fmt(r.get('cold_admission_p99_ms'), '.1f')}"),
        ("upstream connections", lambda r: _fmt(r.get("upstream_connections"), "d")
         if r["system"] != "nchan" else "push"),
    ]
    lines += ["", "## Side by side", "", "| | " + " | ".join(LABELS.get(r["system"], r["system"]) for r in runs) + " |",
              "|---|" + "---|" * len(runs)]
    for label, cell in rows:
        lines.append(f"| {label} | " + " | ".join(cell(r) for r in runs) + " |")
    profiled = [r for r in runs if r.get("profile_top")]
    for r in profiled:
        lines += ["", f"## Gateway during the reconnect: top frames by self time (py-spy, `{r['profile']}`)", "",
                  "| frame | share of samples |", "|---|---|"]
        lines += [f"| `{frame}` | {share:.1%} |" for frame, share in r["profile_top"]]
        lines += ["", "Share of samples with each function on the stack (inclusive; they nest):", "",
                  "| function | share of samples |", "|---|---|"]
        lines += [f"| `{name}` | {share:.1%} |" for name, share in r["profile_phases"]]
    failures = [r for r in runs if r.get("problems")]
    if failures:
        lines += ["", "## Problems", ""]
        lines += [f"- {r['system']}: " + "; ".join(r["problems"])[:600].replace("\n", " ") for r in failures]
    return "\n".join(lines) + "\n"


def run_storm(options: StormOptions, write: bool = True) -> dict[str, Any]:
    """Run the storm against every system in `options`; write `storm.json`/`storm.md` under `options.out` if `write`."""
    started = time.time()
    storm = Storm(options)
    runs: list[dict[str, Any]] = []
    try:
        print(f"reconnect storm, N={options.n:,}; nchan: {storm.bench.nchan or 'not installed'}")
        for system in options.systems:
            if system == "nchan" and storm.bench.nchan is None:
                print("nchan: not installed (apt-get install -y nginx-light libnginx-mod-nchan); skipped")
                continue
            runs.append(storm.run(system))
    finally:
        storm.close()
    for r in runs:
        if r.get("profile", "").endswith(".txt") and Path(r["profile"]).exists():
            r["profile_top"] = top_self(Path(r["profile"]))
            r["profile_phases"] = inclusive(Path(r["profile"]))
    document = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "gateway_revision": _revision(options.gateway_source), "options": options.public(), "runs": runs,
        "targets": [{"target": t, "measured": m, "met": met} for t, m, met in targets(runs, options.target_s)],
    }
    if write:
        options.out.mkdir(parents=True, exist_ok=True)
        (options.out / "storm.json").write_text(json.dumps(document, indent=1, default=str))
        text = markdown(document)
        (options.out / "storm.md").write_text(text)
        print(text)
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench --storm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, help="subscribers (default 10000)")
    parser.add_argument("--systems", help=f"comma-separated, from {','.join(SYSTEMS)} (default all)")
    parser.add_argument("--events-per-s", type=float, help="events per second during the storm (default 5)")
    parser.add_argument("--timeout", type=float, help="longest wait for every subscriber to resume, s (default 60)")
    parser.add_argument("--workers", type=int, help="load generator processes (default 1)")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server and the load generator")
    parser.add_argument("--gateway-source", type=Path, help="run the gateway from another checkout")
    parser.add_argument("--profile", help="py-spy output for the gateway during the reconnect: .svg (flame graph) "
                        "or .txt (collapsed stacks; the top frames by self time go into storm.md)")
    parser.add_argument("--profile-rate", type=int, help="py-spy samples per second (default 1000)")
    args = parser.parse_args(argv)
    options = StormOptions()
    for name in ("n", "events_per_s", "timeout", "workers", "out", "gateway_source", "profile", "profile_rate"):
        value = getattr(args, name)
        if value is not None:
            setattr(options, name, value)
    if args.systems:
        options.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if args.no_pin:
        options.pin = False
    document = run_storm(options)
    return 0 if all(r["ok"] for r in document["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())

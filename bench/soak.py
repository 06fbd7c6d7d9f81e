"""The soak: many evaluations, steady deliveries, subscribers reconnecting and moving, for minutes.

    python -m bench --soak --minutes 10      # 10,000 subscribers, 100 evaluations, 20,000 deliveries/s
    python -m bench --soak --minutes 0.5 --n 200 --evaluations 10 --rate 2000   # a small one

The gateway (`python -m gateway serve`, short `linger` and `history_ttl`) serves N SSE
subscribers with distinct tokens spread over E evaluations; the upstream publishes to each
evaluation at rate/N events per second (so `rate` deliveries per second in all), starting
from a full replay buffer (each evaluation begins with `--replay` events of history, so the
gateway's logs are at their steady-state size from the first second). Meanwhile:

* `--churn` of the subscribers (5%) reconnect every minute, evenly spread, half with
  `Last-Event-ID` and half without (those get the retained history again);
* every `--rotate` seconds (6) the oldest evaluation ends (the upstream sends `final` and
  closes) and a new one starts; its subscribers move to the new one once they have `final`.

Sampled every second: the gateway's RSS and open file descriptors (/proc/<pid>/fd); every
five seconds its `/metrics` (`gateway_subscribers`, `gateway_upstream_streams`). When the load
stops (every subscriber has its evaluation's last event, then all disconnect), the soak waits
for the descriptors and both gauges to return to their baseline (taken before the load) once
`linger` has passed. Reported: the RSS slope after the warm-up (least squares, MB per 10
minutes), the way back to baseline, and whether every subscriber received every event of
every evaluation exactly once and in order (see `bench.churn` for how resumes and restarts
are checked). Results: `bench/results/soak.json`, `soak.md`, `soak.png`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import secrets
import socket
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import procstat
from bench import systems as sut
from bench.run import RESULTS, Bench, Options, _revision

PATH = "/api/v1/evaluations/{stream}/stream"
GAUGES = ("gateway_subscribers", "gateway_upstream_streams")


@dataclass
class SoakOptions:
    """What one soak measures."""

    minutes: float = 10.0
    n: int = 10_000
    evaluations: int = 100
    rate: float = 20_000.0  # deliveries per second in all
    churn: float = 0.05  # share of the subscribers that reconnect each minute
    rotate: float = 6.0  # seconds between one evaluation ending (and a new one starting) and the next
    replay: int = 256  # the gateway's replay_buffer, and the history each evaluation starts with
    linger: float = 2.0  # the gateway's limits.linger (and history_ttl) for this run
    warmup: float | None = None  # seconds of the load left out of the RSS slope (default: 25%, at most 120 s)
    sample: float = 1.0  # seconds between RSS/fd samples
    workers: int = 1
    pin: bool = True
    slope_target: float = 1.0  # MB per 10 minutes
    out: Path = RESULTS
    plot: bool = True
    gateway_source: Path = sut.REPO

    @property
    def duration(self) -> float:
        return self.minutes * 60.0

    @property
    def warmup_s(self) -> float:
        return self.warmup if self.warmup is not None else min(120.0, 0.25 * self.duration)

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        data["gateway_source"] = str(self.gateway_source)
        data["warmup_s"] = self.warmup_s
        return data


def scrape(port: int, names: tuple[str, ...] = GAUGES, timeout: float = 5.0) -> dict[str, float]:
    """The sum over all label sets of each metric in `names`, from the gateway's `/metrics`."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    body = b"".join(chunks).partition(b"\r\n\r\n")[2].decode("utf-8", "replace")
    values = dict.fromkeys(names, 0.0)
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in values:
            values[name] += float(line.rsplit(" ", 1)[1])
    return values


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (x, y) points, or None for fewer than 3."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


class Soak:
    """One soak run: the upstream/publisher, the load generator and the gateway."""

    def __init__(self, options: SoakOptions) -> None:
        self.options = options
        self.bench = Bench(Options(workers=options.workers, gateway_source=options.gateway_source))
        self.tag = secrets.token_hex(3)
        self.count = 0
        self.samples: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.streams_used: list[str] = []
        self.t0 = 0.0
        self.server: sut.Running | None = None

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.bench.close()

    def name(self) -> str:
        self.count += 1
        name = f"soak{self.count}-{self.tag}"
        self.streams_used.append(name)
        return name

    @property
    def per_evaluation_rate(self) -> float:
        return self.options.rate / self.options.n

    def begin(self, stream: str, phase: float, history: int | None = None) -> None:
        self.bench.publisher.call({"cmd": "begin", "stream": stream, "rate": self.per_evaluation_rate,
                                   "history": self.options.replay if history is None else history, "phase": phase})

    def sample(self, phase: str, metrics: bool) -> dict[str, Any]:
        assert self.server is not None
        pid = self.server.proc.pid
        point: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 3), "phase": phase,
                                 "rss": procstat.rss_bytes(pid), "fds": open_fds(pid),
                                 "cpu_s": round(procstat.cpu_seconds(pid), 3)}
        if metrics:
            with contextlib.suppress(OSError):
                point.update(scrape(self.server.port))
        self.samples.append(point)
        return point

    def run(self) -> dict[str, Any]:
        opts = self.options
        bench = self.bench
        result: dict[str, Any] = {"problems": self.problems}
        self.server = server = sut.start_gateway(
            bench.upstream_url, bench.api_key, bench.secret, opts.gateway_source,
            limits={"replay_buffer": opts.replay, "linger": opts.linger, "history_ttl": opts.linger})
        self.t0 = time.monotonic()
        result["baseline"] = baseline = self._warm_up()
        print(f"baseline: RSS {baseline['rss'] / 2**20:.1f} MB, {baseline['fds']} fds, "
              f"subscribers {baseline.get('gateway_subscribers')}, upstream streams "
              f"{baseline.get('gateway_upstream_streams')}", flush=True)

        live = [self.name() for _ in range(opts.evaluations)]
        for k, stream in enumerate(live):
            self.begin(stream, phase=k / opts.evaluations)
        replies = bench.loadgen.churn_connect(opts.n, host="127.0.0.1", port=server.port, path=PATH, streams=live,
                                              secret=bench.secret, run=f"soak-{self.tag}",
                                              ttl=opts.duration + 3600, concurrency=200)
        statuses: Counter[str] = Counter()
        for reply in replies:
            statuses.update(reply["statuses"])
        result["connect_s"] = round(max(r["seconds"] for r in replies), 2)
        result["connect_statuses"] = dict(statuses)
        if statuses.get("ok", 0) != opts.n:
            self.problems.append(f"only {statuses.get('ok', 0)} of {opts.n} subscribed: {dict(statuses)}")
        result["pinned"] = self._pin()
        load_started = time.monotonic()
        result["load_started_t"] = round(load_started - self.t0, 3)
        bench.loadgen.churn("soak", per_minute=opts.churn, seed=random.randrange(1 << 30))
        print(f"{opts.n:,} subscribers on {opts.evaluations} evaluations in {result['connect_s']} s; "
              f"{opts.rate:,.0f} deliveries/s for {opts.minutes:g} min", flush=True)

        rotations = 0
        moved = 0
        end = load_started + opts.duration
        next_sample = time.monotonic()
        next_rotate = load_started + opts.rotate
        ticks = 0
        while (now := time.monotonic()) < end:
            if now >= next_rotate:
                next_rotate += opts.rotate
                old, new = live.pop(0), self.name()
                self.begin(new, phase=random.random())
                moved += sum(r["moving"] for r in bench.loadgen.churn("move", old=old, new=new))
                bench.publisher.call({"cmd": "end", "stream": old})
                live.append(new)
                rotations += 1
            if now >= next_sample:
                next_sample += opts.sample
                point = self.sample("load", metrics=ticks % 5 == 0)
                ticks += 1
                if ticks % 30 == 0:
                    print(f"  t={point['t']:.0f}s RSS {point['rss'] / 2**20:.1f} MB, {point['fds']} fds, "
                          f"{rotations} evaluations ended", flush=True)
            time.sleep(max(0.0, min(next_sample, next_rotate, end) - time.monotonic()))
        load_ended = time.monotonic()
        result.update({"rotations": rotations, "moved": moved, "load_s": round(load_ended - load_started, 2)})

        # Stop: no more reconnects, no more events; every subscriber must get to its evaluation's end.
        bench.loadgen.churn("soak", per_minute=0)
        published = bench.publisher.call({"cmd": "halt"})["published"]
        checks = bench.loadgen.churn("check", wait=90, published=published, timeout=60)
        stats = _merge_stats(bench.loadgen.churn("stats"))
        result["complete"] = sum(c["complete"] for c in checks)
        result["late_samples"] = [x for c in checks for x in c["late_samples"]][:5]
        result["loaded"] = self.sample("loaded", metrics=True)
        result.update(stats)
        bench.loadgen.churn("close")
        stopped = time.monotonic()
        result["after"] = self._back_to_baseline(baseline, stopped)
        upstream = bench.publisher.call({"cmd": "upstream", "streams": self.streams_used})
        opened = Counter(upstream["opened"].values())
        result["upstream_opened"] = {str(k): v for k, v in sorted(opened.items())}
        result["upstream_open_after"] = upstream["open"]
        self._judge(result, opts.n)
        return result

    def _warm_up(self) -> dict[str, Any]:
        """One subscriber through one whole evaluation (events, `final`, a move), then the baseline."""
        bench = self.bench
        assert self.server is not None
        first, second = f"warm1-{self.tag}", f"warm2-{self.tag}"
        bench.publisher.call({"cmd": "begin", "stream": first, "rate": 50.0, "history": 10})
        bench.publisher.call({"cmd": "begin", "stream": second, "rate": 0.0, "history": 5})
        bench.loadgen.churn_connect(1, host="127.0.0.1", port=self.server.port, path=PATH, streams=[first],
                                    secret=bench.secret, run=f"warm-{self.tag}", concurrency=1)
        bench.loadgen.churn("settle", timeout=10)
        bench.loadgen.churn("move", old=first, new=second)
        bench.publisher.call({"cmd": "end", "stream": first})
        bench.loadgen.churn("check", published={second: 5}, timeout=10)
        bench.loadgen.churn("close")
        bench.publisher.call({"cmd": "halt"})
        # The unended topic is dropped `linger` after the subscriber left; the ended one's
        # history_ttl (no gauge shows it) started earlier, when the subscriber moved away.
        deadline = time.monotonic() + self.options.linger + 15
        point = self.sample("warm-up", metrics=True)
        while time.monotonic() < deadline and (point.get("gateway_subscribers") != 0
                                               or point.get("gateway_upstream_streams") != 0):
            time.sleep(0.25)
            point = self.sample("warm-up", metrics=True)
        return self.sample("baseline", metrics=True)

    def _back_to_baseline(self, baseline: dict[str, Any], stopped: float) -> dict[str, Any]:
        """Sample until fds and both gauges are back at their baseline, or until linger + 30 s have passed."""
        deadline = stopped + self.options.linger + 30
        point = self.sample("after", metrics=True)

        def back(p: dict[str, Any]) -> bool:
            return p["fds"] <= baseline["fds"] and all(p.get(g) == baseline.get(g) for g in GAUGES)

        while not back(point) and time.monotonic() < deadline:
            time.sleep(0.25)
            point = self.sample("after", metrics=True)
        returned = back(point)
        return {**point, "back": returned, "seconds": round(time.monotonic() - stopped, 2) if returned else None}

    def _judge(self, result: dict[str, Any], n: int) -> None:
        problems = self.problems
        if result["violations"]:
            problems.append(f"{result['violations']} sequence violations (gaps or duplicates) at "
                            f"{result['violators']} subscribers: {result['violation_samples'][:3]}")
        if result["complete"] != n:
            problems.append(f"{n - result['complete']} subscribers did not get their evaluation's last event: "
                            f"{result['late_samples'][:3]}")
        if result["moves_without_final"]:
            problems.append(f"{result['moves_without_final']} streams of ended evaluations ended without `final`")
        if not result["after"]["back"]:
            problems.append(f"not back to baseline after the load: {result['after']}")
        if set(result["upstream_opened"]) - {"1"}:
            problems.append(f"evaluations by upstream connections opened: {result['upstream_opened']} (must be 1 each)")
        if result["upstream_open_after"]:
            problems.append(f"{result['upstream_open_after']} upstream connections still open after the load")

    def _pin(self) -> bool:
        cpus = sorted(os.sched_getaffinity(0))
        if not self.options.pin or len(cpus) < 2 or self.server is None:
            return False
        return procstat.pin(self.server.pids, {cpus[0]}) and procstat.pin(self.bench.loadgen.pids, set(cpus[1:]))


def _merge_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {key: sum(s[key] for s in stats) for key in
                              ("deliveries", "replayed", "violations", "violators", "moves", "moves_without_final")}
    merged["violation_samples"] = [x for s in stats for x in s["violation_samples"]][:5]
    for key in ("reconnects", "ends", "close_codes", "statuses"):
        total: Counter[str] = Counter()
        for s in stats:
            total.update(s[key])
        merged[key] = dict(total)
    return merged


def analyse(result: dict[str, Any], samples: list[dict[str, Any]], options: SoakOptions) -> dict[str, Any]:
    """The RSS slope after the warm-up, in MB per 10 minutes, and the RSS range under load."""
    start = result["load_started_t"] + options.warmup_s
    stop = result["load_started_t"] + result["load_s"]
    points = [(p["t"], p["rss"] / 2**20) for p in samples if p["phase"] == "load" and start <= p["t"] <= stop]
    per_s = slope(points)
    load = [p["rss"] for p in samples if p["phase"] == "load"]
    return {
        "slope_mb_per_10min": None if per_s is None else per_s * 600, "slope_points": len(points),
        "rss_load_min": min(load, default=None), "rss_load_max": max(load, default=None),
        "fit": None if per_s is None else {"from_t": start, "to_t": stop, "slope_mb_per_s": per_s,
                                           "mean_t": sum(x for x, _ in points) / len(points),
                                           "mean_mb": sum(y for _, y in points) / len(points)},
    }


def markdown(document: dict[str, Any]) -> str:
    opts = document["options"]
    r = document["result"]
    a = document["analysis"]
    machine = document["machine"]
    base, loaded, after = r["baseline"], r.get("loaded", {}), r["after"]
    slope_value = a["slope_mb_per_10min"]
    slope_met = None if slope_value is None else slope_value < opts["slope_target"]
    gaps_met = not r["violations"] and r["complete"] == opts["n"] and not r["moves_without_final"]

    def mb(value: Any) -> str:
        return "n/a" if value is None else f"{value / 2**20:.1f}"

    def met(flag: bool | None) -> str:
        return "n/a" if flag is None else ("**met**" if flag else "**not met**")

    reconnects = r.get("reconnects", {})
    lines = [
        f"# Soak with churn, {document['started']}",
        "",
        f"{machine['cpus']} CPUs, Python {machine['python']}, kernel {machine['kernel']}; loopback; "
        f"{opts['n']:,} SSE subscribers (distinct tokens) over {opts['evaluations']} evaluations, "
        f"{opts['rate']:,.0f} deliveries/s, {opts['minutes']:g} min; {opts['churn']:.0%} of the subscribers "
        f"reconnect per minute (half with `Last-Event-ID`); one evaluation ends and one starts every "
        f"{opts['rotate']:g} s; replay buffer {opts['replay']} events (each evaluation starts with that much "
        f"history); linger and history_ttl {opts['linger']:g} s; RSS slope fitted after a {opts['warmup_s']:.0f} s "
        f"warm-up; gateway at {document['gateway_revision']}; elapsed {document['elapsed_s']:.0f} s.",
        "",
        "## Targets (issue 18)",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| RSS slope after warm-up < {opts['slope_target']:g} MB per 10 minutes | "
        + ("n/a" if slope_value is None else f"{slope_value:+.2f} MB per 10 min ({a['slope_points']} samples)")
        + f" | {met(slope_met)} |",
        f"| open fds back to baseline after the load stops | {base['fds']} → {loaded.get('fds', 'n/a')} under load → "
        f"{after['fds']} after | {met(after['fds'] <= base['fds'])} |",
        "| live topics back to baseline (`gateway_upstream_streams`, `gateway_subscribers`) | "
        f"{base.get('gateway_upstream_streams', 'n/a'):g} / {base.get('gateway_subscribers', 'n/a'):g} → "
        f"{loaded.get('gateway_upstream_streams', float('nan')):g} / "
        f"{loaded.get('gateway_subscribers', float('nan')):g} → "
        f"{after.get('gateway_upstream_streams', float('nan')):g} / {after.get('gateway_subscribers', float('nan')):g}"
        + (f", back {after['seconds']:.1f} s after the load stopped" if after.get("back") else "")
        + f" | {met(all(after.get(g) == base.get(g) for g in GAUGES))} |",
        f"| zero delivery gaps (every event of every evaluation once, in order, per subscriber) | "
        f"{r['violations']} violations at {r['violators']} subscribers; {r['complete']:,} of {opts['n']:,} "
        f"reached their evaluation's last event | {met(gaps_met)} |",
        "",
        "## What happened",
        "",
        "| | |",
        "|---|---|",
        f"| RSS: baseline / under load min to max / after, MB | {mb(base['rss'])} / {mb(a['rss_load_min'])} to "
        f"{mb(a['rss_load_max'])} / {mb(after['rss'])} |",
        f"| events delivered (replayed history included) | {r['deliveries']:,} ({r['replayed']:,} replayed after a "
        "reconnect without an id) |",
        f"| reconnects with `Last-Event-ID` / without an id | {reconnects.get('with Last-Event-ID', 0):,} / "
        f"{reconnects.get('without an id', 0):,} |",
        f"| evaluations ended / subscribers moved after `final` | {r['rotations']} / {r['moves']:,} |",
        f"| streams the server ended otherwise (reconnected with `Last-Event-ID`) | "
        f"{reconnects.get('after a server close', 0):,} {r.get('close_codes') or ''} |",
        f"| upstream connections per evaluation (opened: evaluations) | {r['upstream_opened']} |",
        f"| initial connect | {opts['n']:,} in {r['connect_s']} s |",
    ]
    if r["problems"]:
        lines += ["", "## Problems", ""] + [f"- {p[:600]}" for p in r["problems"]]
    return "\n".join(lines) + "\n"


def plot(document: dict[str, Any], path: Path) -> bool:
    """RSS over time with the fitted slope; fds and the two gauges over time. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot")
        return False
    samples = document["samples"]
    result, analysis = document["result"], document["analysis"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    ts = [p["t"] for p in samples]
    top.plot(ts, [p["rss"] / 2**20 for p in samples], lw=1, label="gateway RSS")
    fit = analysis.get("fit")
    if fit:
        xs = [fit["from_t"], fit["to_t"]]
        top.plot(xs, [fit["mean_mb"] + fit["slope_mb_per_s"] * (x - fit["mean_t"]) for x in xs], "r--",
                 label=f"least squares after warm-up: {analysis['slope_mb_per_10min']:+.2f} MB / 10 min")
    load_from = result["load_started_t"]
    load_to = load_from + result["load_s"]
    for ax in (top, bottom):
        ax.axvspan(load_from, load_from + document["options"]["warmup_s"], color="0.9", label="warm-up")
        ax.axvline(load_to, color="0.5", ls=":", label="load stops")
        ax.grid(alpha=0.3)
    top.set_ylabel("MB")
    top.legend(loc="lower right")
    top.set_title(f"Soak: {document['options']['n']:,} subscribers, {document['options']['evaluations']} evaluations, "
                  f"{document['options']['rate']:,.0f} deliveries/s ({document['started']})")
    bottom.plot(ts, [p["fds"] for p in samples], lw=1, label="open fds")
    with_metrics = [p for p in samples if "gateway_subscribers" in p]
    bottom.plot([p["t"] for p in with_metrics], [p["gateway_subscribers"] for p in with_metrics], ".",
                label="gateway_subscribers")
    twin = bottom.twinx()
    twin.plot([p["t"] for p in with_metrics], [p["gateway_upstream_streams"] for p in with_metrics], "g.",
              label="gateway_upstream_streams")
    twin.set_ylabel("upstream streams")
    bottom.set_xlabel("seconds")
    bottom.set_ylabel("fds, subscribers")
    handles = bottom.get_legend_handles_labels()
    twin_handles = twin.get_legend_handles_labels()
    bottom.legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1], loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run_soak(options: SoakOptions, write: bool = True) -> dict[str, Any]:
    """Run one soak; write `soak.json`, `soak.md` (and `soak.png`) under `options.out` if `write`."""
    started = time.time()
    soak = Soak(options)
    try:
        try:
            result = soak.run()
        except Exception as exc:
            tail = soak.server.tail_log() if soak.server is not None else ""
            raise RuntimeError(f"soak failed: {exc!r}\n{tail[-1500:]}") from exc
    finally:
        soak.close()
    document = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "elapsed_s": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "gateway_revision": _revision(options.gateway_source), "options": options.public(), "result": result,
        "analysis": analyse(result, soak.samples, options), "samples": soak.samples,
    }
    result["ok"] = not result["problems"]
    if write:
        options.out.mkdir(parents=True, exist_ok=True)
        (options.out / "soak.json").write_text(json.dumps(document, indent=1, default=str))
        text = markdown(document)
        (options.out / "soak.md").write_text(text)
        if options.plot:
            plot(document, options.out / "soak.png")
        print(text)
    return document


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench --soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, help="length of the load (default 10)")
    parser.add_argument("--n", type=int, help="subscribers (default 10000)")
    parser.add_argument("--evaluations", type=int, help="evaluations live at once (default 100)")
    parser.add_argument("--rate", type=float, help="deliveries per second in all (default 20000)")
    parser.add_argument("--churn", type=float, help="share of subscribers reconnecting per minute (default 0.05)")
    parser.add_argument("--rotate", type=float, help="seconds between evaluation ends (default 6)")
    parser.add_argument("--replay", type=int, help="gateway replay buffer = history per evaluation (default 256)")
    parser.add_argument("--linger", type=float, help="gateway linger and history_ttl, s (default 2)")
    parser.add_argument("--warmup", type=float, help="seconds left out of the RSS slope (default 25%%, <= 120)")
    parser.add_argument("--workers", type=int, help="load generator processes (default 1)")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-pin", action="store_true", help="do not pin the gateway and the load generator")
    parser.add_argument("--gateway-source", type=Path, help="run the gateway from another checkout")
    args = parser.parse_args(argv)
    options = SoakOptions()
    for name in ("minutes", "n", "evaluations", "rate", "churn", "rotate", "replay", "linger", "warmup", "workers",
                 "out", "gateway_source"):
        value = getattr(args, name)
        if value is not None:
            setattr(options, name, value)
    if args.no_plot:
        options.plot = False
    if args.no_pin:
        options.pin = False
    if options.evaluations > options.n:
        parser.error("--evaluations must not exceed --n")
    document = run_soak(options)
    return 0 if document["result"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

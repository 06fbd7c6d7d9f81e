"""Turns a benchmark document (`latest.json`) into the markdown table and the PNG plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

COLUMNS = (("gateway", "sse", "gateway SSE"), ("gateway", "ws", "gateway WS"), ("naive", "sse", "naive Python"),
           ("nchan", "sse", "nchan"), ("raw", "sse", "raw uvloop, no ASGI"),
           ("gateway-redis", "sse", "gateway SSE via Redis"))


class Summary:
    """Median rows of one document, looked up by (system, transport, N, mode)."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.rows = {(r["system"], r["transport"], r["n"], r["mode"]): r for r in document["summary"]}
        self.columns = [c for c in COLUMNS if any(k[:2] == c[:2] for k in self.rows)]

    def get(self, system: str, transport: str, n: int, mode: str, key: str) -> Any:
        row = self.rows.get((system, transport, n, mode))
        return None if row is None else row.get(key)

    def ns(self, mode: str) -> list[int]:
        return sorted({k[2] for k in self.rows if k[3] == mode})


def _num(value: Any, fmt: str = ",.0f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, fmt) + suffix


def _ratio(a: Any, b: Any) -> float | None:
    if not a or not b:
        return None
    return float(a) / float(b)


def targets(s: Summary) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each target of issue 3 the document can speak to."""
    out: list[tuple[str, str, bool | None]] = []

    def tput(system: str, n: int, transport: str = "sse") -> Any:
        return s.get(system, transport, n, "closed", "deliveries_per_s")

    for n, factor, other in ((1000, 1.5, "nchan"), (5000, 2.0, "nchan"), (1000, 8.0, "naive")):
        ratio = _ratio(tput("gateway", n), tput(other, n))
        measured = f"{_num(tput('gateway', n))} vs {_num(tput(other, n))}/s = {_num(ratio, '.2f', 'x')}"
        out.append((f"max deliveries/s at N={n} >= {factor}x {other}", measured,
                    None if ratio is None else ratio >= factor))
    g99 = s.get("gateway", "sse", 5000, "rate", "p99_ms")
    n99 = s.get("nchan", "sse", 5000, "rate", "p99_ms")
    out.append(("p99 at a fixed 20k deliveries/s, N=5000 <= nchan's",
                f"{_num(g99, '.1f', ' ms')} vs {_num(n99, '.1f', ' ms')}",
                None if g99 is None or n99 is None else g99 <= n99))
    mem = s.get("gateway", "sse", 5000, "closed", "per_sub_bytes")
    nmem = s.get("nchan", "sse", 5000, "closed", "per_sub_bytes")
    out.append(("<= 8 KB server memory per idle SSE subscriber at N=5000",
                f"{_num(mem and mem / 1024, '.1f', ' KB')} (nchan {_num(nmem and nmem / 1024, '.1f', ' KB')})",
                None if mem is None else mem <= 8 * 1024))
    holds = [k for k in s.rows if k[0] == "gateway" and k[1] == "sse" and k[3] == "hold"]
    if holds:
        row = s.rows[holds[0]]
        out.append((f"{holds[0][2]:,} concurrent subscribers held by one process",
                    f"{row['n']:,} held, {_num(row['per_sub_bytes'] and row['per_sub_bytes'] / 1024, '.1f', ' KB')}"
                    f" each, all got every message: {row['exactly_once_in_order']}", bool(row["ok"])))
    conns = [r.get("upstream_connections") for k, r in s.rows.items() if k[0] == "gateway"]
    out.append(("exactly one upstream connection per resource at every N",
                f"max {max((c for c in conns if c is not None), default='n/a')} over {len(conns)} cells",
                None if not conns else all(c == 1 for c in conns)))
    closed = s.ns("closed")
    if closed:
        lo, hi = min(closed), max(closed)
        a = s.get("gateway", "sse", lo, "closed", "server_us_per_delivery")
        b = s.get("gateway", "sse", hi, "closed", "server_us_per_delivery")
        ratio = _ratio(b, a)
        out.append((f"CPU per delivery grows <= 1.5x from N={lo} to N={hi}",
                    f"{_num(a, '.2f')} -> {_num(b, '.2f')} us = {_num(ratio, '.2f', 'x')}",
                    None if ratio is None else ratio <= 1.5))
    ws = [(n, _ratio(s.get("gateway", "ws", n, "closed", "deliveries_per_s"), tput("gateway", n))) for n in closed]
    if any(r is not None for _, r in ws):
        worst = min(r for _, r in ws if r is not None)
        out.append(("WebSocket within 20% of SSE (closed-loop deliveries/s)",
                    ", ".join(f"N={n}: {_num(r, '.2f', 'x')}" for n, r in ws), worst >= 0.8))
    else:
        out.append(("WebSocket within 20% of SSE", f"n/a ({s.document.get('websocket') or 'not run'})", None))
    out.append(("every subscriber got every message exactly once, in order (all runs, all systems)",
                ", ".join(f"{k[0]}/{k[1]} N={k[2]} {k[3]}" for k, r in s.rows.items()
                          if not r["exactly_once_in_order"]) or "yes",
                all(r["exactly_once_in_order"] for r in s.rows.values())))
    return out


def markdown(document: dict[str, Any]) -> str:
    s = Summary(document)
    opts = document["options"]
    lines = [
        f"# Fan-out benchmark, {document['started']}",
        "",
        f"{document['machine']['cpus']} CPUs, Python {document['machine']['python']}, kernel "
        f"{document['machine']['kernel']}; loopback; ~90-byte payloads; {opts['workers']} load-generator "
        f"process(es); medians of {opts['repeats']} run(s); closed loop with W={opts['window']} messages in flight; "
        f"fixed rate {opts['rate']:,.0f} deliveries/s; "
        + ("server pinned to one CPU, load generator to the others; " if opts.get("pin") else
           "server and load generator placed by the scheduler; ")
        + f"gateway at {document.get('gateway_revision', '?')}; "
        f"elapsed {document['elapsed_s']:.0f} s.",
        "",
        "## Targets (issue 3)",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for name, measured, met in targets(s):
        lines.append(f"| {name} | {measured} | {'n/a' if met is None else ('**met**' if met else '**not met**')} |")
    header = "| N | " + " | ".join(label for _, _, label in s.columns) + " |"
    rule = "|---|" + "---|" * len(s.columns)

    def table(title: str, mode: str, cell: Any) -> None:
        ns = s.ns(mode)
        if not ns:
            return
        lines.extend(["", f"## {title}", "", header, rule])
        for n in ns:
            lines.append(f"| {n:,} | " + " | ".join(cell(sys_, tr, n, mode) for sys_, tr, _ in s.columns) + " |")

    def tput(system: str, transport: str, n: int, mode: str) -> str:
        value = s.get(system, transport, n, mode, "deliveries_per_s")
        out = _num(value)
        if system == "gateway" and value:
            ratios = [f"{_num(_ratio(value, s.get(o, 'sse', n, mode, 'deliveries_per_s')), '.1f', 'x')} {o}"
                      for o in ("nchan", "naive") if s.get(o, "sse", n, mode, "deliveries_per_s")]
            out += f" ({', '.join(ratios)})" if ratios else ""
        return out

    def lat(system: str, transport: str, n: int, mode: str) -> str:
        keys = ("p50_ms", "p90_ms", "p99_ms", "max_ms")
        values = [s.get(system, transport, n, mode, k) for k in keys]
        return "n/a" if values[0] is None else " / ".join(_num(v, ".1f") for v in values)

    def mem(system: str, transport: str, n: int, mode: str) -> str:
        per = s.get(system, transport, n, mode, "per_sub_bytes")
        idle = s.get(system, transport, n, mode, "rss_idle")
        peak = s.get(system, transport, n, mode, "rss_peak")
        if per is None:
            return "n/a"
        return f"{per / 1024:.1f} KB ({_num(idle and idle / 2**20, '.0f')} / {_num(peak and peak / 2**20, '.0f')} MB)"

    def cpu(system: str, transport: str, n: int, mode: str) -> str:
        a = s.get(system, transport, n, mode, "server_us_per_delivery")
        b = s.get(system, transport, n, mode, "loadgen_us_per_delivery")
        return "n/a" if a is None else f"{a:.2f} / {b:.2f}"

    def check(system: str, transport: str, n: int, mode: str) -> str:
        row = s.rows.get((system, transport, n, mode))
        if row is None:
            return "n/a"
        conns = row.get("upstream_connections")
        return (("yes" if row["exactly_once_in_order"] else "**NO**")
                + f", upstream {conns if conns is not None else 'push'}")

    table("Closed loop: max deliveries/s (gateway's ratio to nchan and naive)", "closed", tput)
    table("Closed loop: latency p50 / p90 / p99 / max, ms (W messages in flight)", "closed", lat)
    table(f"Fixed rate {opts['rate']:,.0f} deliveries/s: latency p50 / p90 / p99 / max, ms", "rate", lat)
    table("Server memory per subscriber ((RSS with N - RSS before) / N; idle / peak RSS)", "closed", mem)
    table("Holding idle subscribers: memory per subscriber (idle / peak RSS)", "hold", mem)
    table("CPU per delivery, microseconds: server / load generator (closed loop)", "closed", cpu)
    table("Exactly once, in order; upstream connections (closed loop)", "closed", check)
    table("Exactly once, in order; upstream connections (fixed rate)", "rate", check)
    failures = [r for r in document["runs"] if r.get("problems")]
    if failures:
        lines.extend(["", "## Problems", ""])
        for r in failures:
            lines.append(f"- {r['system']}/{r['transport']} N={r['n']} {r['mode']} #{r['repeat'] + 1}: "
                         + "; ".join(r["problems"])[:600].replace("\n", " "))
    return "\n".join(lines) + "\n"


def plot(document: dict[str, Any], path: Path) -> bool:
    """Deliveries/s and p99 against N for each system; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot")
        return False
    s = Summary(document)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (("closed", "deliveries_per_s", "max deliveries/s (closed loop)"),
              ("closed", "p99_ms", "p99 latency, ms (closed loop)"),
              ("rate", "p99_ms", f"p99 latency, ms (fixed {document['options']['rate']:,.0f} deliveries/s)"))
    for ax, (mode, key, title) in zip(axes, panels, strict=True):
        for system, transport, label in s.columns:
            ns = [n for n in s.ns(mode) if s.get(system, transport, n, mode, key) is not None]
            if ns:
                ax.plot(ns, [s.get(system, transport, n, mode, key) for n in ns], marker="o", label=label)
        ax.set_xscale("log")
        if key == "p99_ms":
            ax.set_yscale("log")
        ax.set_xlabel("subscribers N")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Fan-out, {document['started']} ({document['machine']['cpus']} CPUs, loopback)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

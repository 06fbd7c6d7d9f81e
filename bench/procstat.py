"""CPU time and memory of processes, read straight from /proc (Linux only, no dependencies)."""

from __future__ import annotations

import os
import resource

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # Fields after the command name: state is index 0, utime 11, stime 12.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size now."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (FileNotFoundError, ProcessLookupError):
        return 0


def peak_rss_bytes(pid: int) -> int:
    """The high-water mark of the resident set (VmHWM), since start or the last `reset_peak`."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False if the kernel refuses."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def children(pid: int) -> list[int]:
    """Direct children of a process (e.g. nginx's worker)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found.extend(int(p) for p in f.read().split())
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def raise_fd_limit(wanted: int = 1 << 20) -> int:
    """Raise this process's open-file limit as far as the hard limit allows; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pin(pids: list[int], cpus: set[int]) -> bool:
    """Restrict every thread of each process to `cpus`; False if any could not be pinned.

    Affinity is per thread, so each task of the process is set (threads started later
    inherit it from their creator).
    """
    ok = True
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except (FileNotFoundError, ProcessLookupError):
            ok = False
            continue
        for task in tasks:
            try:
                os.sched_setaffinity(int(task), cpus)
            except (ProcessLookupError, PermissionError, OSError):
                ok = False
    return ok


def tcp_counters(names: tuple[str, ...] = ("ListenOverflows", "ListenDrops", "TCPSynRetrans")) -> dict[str, int]:
    """System-wide TCP counters (`TcpExt` of /proc/net/netstat): listen-queue overflows, SYN retransmissions."""
    found: dict[str, int] = {}
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        if header.startswith("TcpExt:") and values.startswith("TcpExt:"):
            found.update((k, int(v)) for k, v in zip(header.split()[1:], values.split()[1:], strict=False)
                         if k in names)
    return found

"""CPU time and peak memory of a process tree, read from Linux ``/proc`` (psutil is not a
dependency).

A worker is a process tree (``tierstream worker --roles all`` is a supervisor plus one
child per role), so figures are summed over the tree. CPU is sampled at the start and end
of the measured window; peak RSS is each process's high-water mark (``VmHWM``), which the
kernel keeps, so no sampling can miss a peak.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PROC = Path("/proc")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    task_dir = _PROC / str(pid) / "task"
    try:
        tids = [t.name for t in task_dir.iterdir()]
    except OSError:
        return kids
    for tid in tids:
        try:
            kids += [int(c) for c in (task_dir / tid / "children").read_text().split()]
        except OSError:
            continue
    return kids


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive now."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        if (_PROC / str(current)).exists():
            found.append(current)
            todo.extend(_children(current))
    return found


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process (not its children), None if gone."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def status_kb(pid: int, key: str) -> int | None:
    """A ``kB`` field of ``/proc/<pid>/status`` (VmHWM, VmRSS), None if gone."""
    try:
        for line in (_PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def short_command(pid: int) -> str:
    """A process's role, for reports: what follows ``--roles``/``--role``, else its program."""
    try:
        args = (_PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    for flag in ("--roles", "--role"):
        if flag in args and args.index(flag) + 1 < len(args):
            return args[args.index(flag) + 1]
    return Path(args[0]).name if args and args[0] else "?"


@dataclass
class TreeSampler:
    """Tracks the process trees under some root pids across a measured window."""

    roots: list[int]
    cpu_start: dict[int, float] = field(default_factory=dict)
    cpu_last: dict[int, float] = field(default_factory=dict)
    hwm_kb: dict[int, int] = field(default_factory=dict)
    rss_start_kb: dict[int, int] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    rss_max_kb: dict[int, int] = field(default_factory=dict)

    def pids(self) -> list[int]:
        return [p for root in self.roots for p in tree(root)]

    def sample(self) -> None:
        for pid in self.pids():
            cpu = cpu_seconds(pid)
            if cpu is None:
                continue
            if pid not in self.cpu_start:
                self.cpu_start[pid] = cpu
                self.rss_start_kb[pid] = status_kb(pid, "VmRSS") or 0
                self.names[pid] = short_command(pid)
            self.cpu_last[pid] = cpu
            rss = status_kb(pid, "VmRSS")
            if rss is not None:
                self.rss_max_kb[pid] = max(rss, self.rss_max_kb.get(pid, 0))
            hwm = status_kb(pid, "VmHWM")
            if hwm is not None:
                self.hwm_kb[pid] = max(hwm, self.hwm_kb.get(pid, 0))

    def figures(self) -> dict[str, float | int]:
        """CPU seconds used between the first and the last sample, and peak RSS."""
        cpu = sum(self.cpu_last[p] - self.cpu_start[p] for p in self.cpu_last)
        return {
            "processes": len(self.cpu_last),
            "cpu_s": round(cpu, 3),
            "cpu_s_total_since_start": round(sum(self.cpu_last.values()), 3),
            "peak_rss_mb_sum": round(sum(self.hwm_kb.values()) / 1024, 1),
            "peak_rss_mb_max": round(max(self.hwm_kb.values(), default=0) / 1024, 1),
            # RSS when the window opened (idle, after start-up): peak - this is what the
            # measured work cost in memory
            "rss_at_start_mb_sum": round(sum(self.rss_start_kb.values()) / 1024, 1),
            # the largest RSS seen in the samples taken during the window
            "rss_max_sampled_mb_sum": round(sum(self.rss_max_kb.values()) / 1024, 1),
            "per_process": [
                {
                    "pid": pid,
                    "role": self.names.get(pid, "?"),
                    "cpu_s": round(self.cpu_last[pid] - self.cpu_start[pid], 3),
                    "peak_rss_mb": round(self.hwm_kb.get(pid, 0) / 1024, 1),
                    "rss_at_start_mb": round(self.rss_start_kb.get(pid, 0) / 1024, 1),
                }
                for pid in sorted(self.cpu_last)
            ],
        }

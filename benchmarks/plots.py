"""PNG plots of a benchmark report: throughput against worker count, latency CDF, lag over
time. Drawn from the JSON report alone (``python -m benchmarks.plots report.json`` redraws
a saved run). matplotlib is optional (``pip install -e '.[bench]'``): without it the
harness writes the JSON and says the plots were skipped.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import orjson


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write_plots(report: dict, stem: Path) -> list[Path]:
    """Write ``<stem>-throughput.png``, ``-latency-cdf.png`` and ``-lag.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    config = report["config"]
    title = f"{config['requests']} requests, simulated latency {config['latency_ms']} ms"
    kinds = sorted({k for run in runs for k in run["pipelines"]})
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in kinds:
        points = [
            (run["workers"], run["pipelines"][kind]["throughput"]["results_per_s"] or 0)
            for run in runs if kind in run["pipelines"]
        ]
        ax.plot([w for w, _ in points], [r for _, r in points], marker="o", label=kind)
    ax.set(xlabel="worker processes (sets of roles)", ylabel="results / s", title=f"Throughput\n{title}")
    ax.set_xticks(sorted({run["workers"] for run in runs}))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, stem, "throughput"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        for kind, figures in run["pipelines"].items():
            values = figures["cdf_ms"]["end_to_end"]
            if values:
                ax.plot(values, [i / (len(values) - 1) for i in range(len(values))],
                        label=f"{kind}, {run['workers']} worker(s)")
    ax.set(xlabel="end-to-end latency, ms (produce to result, burst queueing included)",
           ylabel="fraction of results", title=f"Latency CDF\n{title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    written.append(_save(fig, stem, "latency-cdf"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        for kind, figures in run["pipelines"].items():
            samples = figures["lag"]["samples"]
            ax.plot([s["t_s"] for s in samples], [s["total"] for s in samples],
                    label=f"{kind}, {run['workers']} worker(s)")
    ax.set(xlabel="seconds since the burst started", ylabel="consumer lag, messages (all roles)",
           title=f"Consumer lag (committed offsets)\n{title}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    written.append(_save(fig, stem, "lag"))
    return written


def _save(fig: object, stem: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    path = stem.with_name(f"{stem.name}-{name}.png")
    fig.tight_layout()  # type: ignore[attr-defined]
    fig.savefig(path, dpi=100)  # type: ignore[attr-defined]
    plt.close(fig)  # type: ignore[arg-type]
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.plots REPORT.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    for written in write_plots(orjson.loads(path.read_bytes()), path.with_suffix("")):
        print(written)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Starting and stopping tierstream's own processes (workers, simulator) for the demo,
the tests and the benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def simulator_env(port: int) -> dict[str, str]:
    """Settings that send both providers to the simulator on ``port``, whatever API keys the
    environment holds (so tests and benchmarks never reach a real provider)."""
    return {
        "TIERSTREAM__SIMULATOR__PORT": str(port),
        "TIERSTREAM__PROVIDERS__OPENAI__USE_SIMULATOR": "always",
        "TIERSTREAM__PROVIDERS__ANTHROPIC__USE_SIMULATOR": "always",
    }


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "streams.cli", *args]


def spawn(
    args: list[str], env: Mapping[str, str] | None = None, log_path: Path | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``tierstream <args>`` in its own process group, output to ``log_path``."""
    with open(log_path, "ab") if log_path else open(os.devnull, "wb") as out:  # the child keeps its own copy
        return subprocess.Popen(
            cli_command(*args),
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=cwd,
        )


def stop(proc: subprocess.Popen[bytes], grace: float = 30.0, sig: int = signal.SIGTERM) -> int:
    """Signal the process, wait up to ``grace`` seconds, then kill it. Returns its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def stop_all(procs: Sequence[subprocess.Popen[bytes]], grace: float = 30.0) -> list[int]:
    """:func:`stop` every process at once (each may take its whole grace); their exit codes,
    in order."""
    if not procs:
        return []
    with ThreadPoolExecutor(max_workers=len(procs)) as pool:
        return list(pool.map(lambda proc: stop(proc, grace), procs))


def wait_http_ok(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until it answers 200, the deadline passes, or ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")
        time.sleep(0.1)

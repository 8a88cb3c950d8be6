"""Run several roles from one command: one child process per role.

Each role is its own Faust app and consumer group (see :mod:`streams.app`); running them
as sibling processes also lets the roles use more than one core. If any child exits, the
others are stopped and the supervisor exits with the child's code, so that a process
manager (Kubernetes, systemd) restarts the whole set.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from topologies.topics import Role

GRACE_SECONDS = 30.0


def role_command(role: Role, config_path: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "streams.cli", "worker", "--roles", role]
    if config_path is not None:
        cmd += ["--config", str(config_path)]
    return cmd


def supervise(roles: list[Role], config_path: Path | None) -> int:
    children = {role: subprocess.Popen(role_command(role, config_path)) for role in roles}
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    exit_code = 0
    try:
        while children:
            for role, child in list(children.items()):
                code = child.poll()
                if code is None:
                    continue
                del children[role]
                if not stopping:
                    print(f"tierstream: role {role} exited with {code}; stopping the others", file=sys.stderr)
                    exit_code = code or 1
                    forward(signal.SIGTERM, None)
            time.sleep(0.2)  # a supervision poll interval, not a wait for a condition
    finally:
        deadline = time.monotonic() + GRACE_SECONDS
        for child in children.values():
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
    return exit_code

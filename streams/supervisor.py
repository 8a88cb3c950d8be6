"""Run several roles from one command: one child process per role.

Each role is its own Faust app and consumer group (see :mod:`streams.runtime.worker`); running them
as sibling processes also lets the roles use more than one core. If any child exits, the
others are stopped and the supervisor exits with the child's code, so that a process
manager (Kubernetes, systemd) restarts the whole set.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from streams.processes import cli_command
from topologies.config import ENV_PREFIX, load_settings
from topologies.topics import Role

# Beyond each child's own shutdown grace: time to commit and leave the group.
STOP_MARGIN_SECONDS = 10.0
HEALTH_PORT_ENV = f"{ENV_PREFIX}WORKER__HEALTH_PORT"


def role_command(role: Role, config_path: Path | None) -> list[str]:
    cmd = cli_command("worker", "--roles", role)
    if config_path is not None:
        cmd += ["--config", str(config_path)]
    return cmd


def role_env(base: dict[str, str], health_port: int, index: int) -> dict[str, str]:
    """Child ``index``'s environment: its own health port, as siblings share one host.

    Port 0 already means "any free port" for every child, so it is passed on unchanged.
    """
    env = dict(base)
    if health_port:
        env[HEALTH_PORT_ENV] = str(health_port + index)
    return env


def supervise(roles: list[Role], config_path: Path | None, health_port: int | None = None) -> int:
    # The same sources the children read (file, then environment).
    worker_settings = load_settings(config_path).worker
    if health_port is None:
        health_port = worker_settings.health_port
    children = {
        role: subprocess.Popen(
            role_command(role, config_path), env=role_env(dict(os.environ), health_port, i)
        )
        for i, role in enumerate(roles)
    }
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
        deadline = time.monotonic() + worker_settings.shutdown_grace_seconds + STOP_MARGIN_SECONDS
        for child in children.values():
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
    return exit_code

"""Local single-node Kafka broker control for tests, the CLI and the demo.

The broker itself is run by ``kafka.sh`` (KRaft, combined broker+controller,
jars from Maven Central), which ships with its ``pom.xml`` as package data in
``streams/broker_files/``; this module finds it with :mod:`importlib.resources`
(so it works from an installed wheel, not only a checkout), shells out to it
and adds an aiokafka readiness probe. Where the script caches the jars:
:func:`cache_dir`.

This file is also executed by path (``python -P streams/broker.py wait``)
from kafka.sh, so it must not use relative imports or import other
``streams`` modules.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

__all__ = [
    "REPO_ROOT",
    "BrokerError",
    "LocalBroker",
    "cache_dir",
    "free_port",
    "free_ports",
    "kafka_script",
    "wait_until_ready",
    "main",
]

REPO_ROOT: Path = Path(__file__).resolve().parents[1]
"""The source checkout when running from one (tests and benchmarks use it as a working
directory); in an installed package it is site-packages. Nothing here relies on it."""

_POLL_INTERVAL = 0.25
"""Seconds between readiness probes; the deadline, not this, bounds the wait."""


class BrokerError(RuntimeError):
    """kafka.sh failed; the message carries its exit code and output."""

    def __init__(self, action: str, returncode: int, output: str) -> None:
        self.action = action
        self.returncode = returncode
        self.output = output
        super().__init__(
            f"kafka.sh {action} failed with exit code {returncode}:\n{output.rstrip()}"
        )


def kafka_script() -> Path:
    """``kafka.sh`` as shipped in the ``streams`` package, wherever that is installed.

    Resolved on each call rather than at import: this file also runs by path
    (``python -P streams/broker.py wait``), where importing ``streams`` would
    pull in the whole app.
    """
    script = resources.files("streams") / "broker_files" / "kafka.sh"
    # bash runs it and it reads pom.xml beside it: a real directory is needed, which
    # every pip-installed or editable package has (a zipped one would not).
    if not isinstance(script, Path) or not script.is_file():
        raise FileNotFoundError(f"kafka.sh is not installed as a file: {script}")
    return script


def cache_dir() -> Path:
    """Where ``kafka.sh`` keeps the Kafka jars and the default data dirs: ``$TIERSTREAM_CACHE``;
    else ``<checkout>/.cache`` in a source checkout; else ``${XDG_CACHE_HOME:-~/.cache}/tierstream``.
    The script owns that rule; this asks it (``kafka.sh cache-dir``)."""
    proc = subprocess.run(
        ["bash", str(kafka_script()), "cache-dir"], capture_output=True, text=True, timeout=30, check=False
    )
    if proc.returncode != 0:
        raise BrokerError("cache-dir", proc.returncode, proc.stdout + proc.stderr)
    return Path(proc.stdout.strip())


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct free ports, all held open while picking.

    Holding every socket until all are chosen guarantees the ports differ,
    which two separate :func:`free_port` calls do not.
    """
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


@contextlib.contextmanager
def _quiet_aiokafka() -> Iterator[None]:
    """Hide aiokafka's per-attempt connection errors while polling a broker
    that is expected to be down for a while; the last error is reported in
    the TimeoutError instead."""
    loggers = [logging.getLogger(name) for name in ("aiokafka.client", "aiokafka.conn")]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, previous, strict=True):
            logger.setLevel(level)


async def _metadata_once(bootstrap: str, request_timeout: float) -> int:
    """Send one metadata request; return the number of brokers it lists."""
    from aiokafka import AIOKafkaClient  # deferred: keep `--help` and imports cheap

    client = AIOKafkaClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=max(int(request_timeout * 1000), 100),
        client_id="tierstream-broker-probe",
    )
    try:
        await client.bootstrap()
        return len(client.cluster.brokers())
    finally:
        await client.close()


async def wait_until_ready(bootstrap: str, timeout: float) -> None:
    """Poll until the broker at ``bootstrap`` answers a metadata request that
    lists at least one broker.

    Raises:
        TimeoutError: no such answer within ``timeout`` seconds; the message
            names ``bootstrap`` and the last error seen.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_error: str = "no attempt made"
    with _quiet_aiokafka():
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                brokers = await asyncio.wait_for(
                    _metadata_once(bootstrap, min(remaining, 5.0)), timeout=remaining
                )
            except TimeoutError:
                last_error = "metadata request timed out"
            except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
                name = type(exc).__name__
                last_error = str(exc) if name in str(exc) else f"{name}: {exc}"
            else:
                if brokers > 0:
                    return
                last_error = "metadata response listed no brokers"
            await asyncio.sleep(min(_POLL_INTERVAL, max(deadline - loop.time(), 0)))
    raise TimeoutError(
        f"Kafka broker at {bootstrap} did not answer a metadata request "
        f"within {timeout:g}s (last error: {last_error})"
    )


@dataclass
class LocalBroker:
    """A single-node KRaft broker managed by ``kafka.sh`` (:func:`kafka_script`).

    Attributes:
        port: PLAINTEXT listener port on 127.0.0.1.
        data_dir: config, logs and segments; ``None`` lets the script use
            ``<cache>/broker-<port>`` (:func:`cache_dir`).
        version: Kafka release; ``None`` uses the script's default.
        controller_port: KRaft controller port; ``None`` means ``port + 1``.
        extra_env: additional environment for the script (e.g. ``KAFKA_HEAP``).
        sasl_port: if set, an extra SASL_PLAINTEXT listener on 127.0.0.1 with
            mechanisms PLAIN and SCRAM-SHA-256 (``KAFKA_SASL_PORT``); ``None``:
            no SASL listener. Inter-broker and controller traffic stay on
            PLAINTEXT.
        sasl_users: ``{name: password}`` for that listener
            (``KAFKA_SASL_USERS``). SCRAM users are created only when the
            data dir is first formatted; PLAIN users on every start. Kept out
            of ``repr()``.
    """

    port: int = 9092
    data_dir: Path | None = None
    version: str | None = None
    controller_port: int | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    sasl_port: int | None = None
    sasl_users: dict[str, str] | None = field(default=None, repr=False)
    reused: bool = field(default=False, init=False)
    """Set by :meth:`start`: True if the broker was already running, so a
    caller that did not start it can leave it running."""

    @classmethod
    def on_free_ports(
        cls,
        data_dir: Path | None = None,
        version: str | None = None,
        sasl_users: dict[str, str] | None = None,
    ) -> LocalBroker:
        """A broker whose listener and controller ports are both currently free;
        with ``sasl_users``, also a SASL_PLAINTEXT listener on a third free port."""
        if sasl_users is None:
            port, controller_port = free_ports(2)
            return cls(port=port, controller_port=controller_port, data_dir=data_dir, version=version)
        port, controller_port, sasl_port = free_ports(3)
        return cls(
            port=port,
            controller_port=controller_port,
            data_dir=data_dir,
            version=version,
            sasl_port=sasl_port,
            sasl_users=dict(sasl_users),
        )

    @property
    def bootstrap_servers(self) -> str:
        """The ``host:port`` clients should bootstrap from."""
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap_servers(self) -> str | None:
        """The SASL_PLAINTEXT listener's ``host:port``, or ``None`` without one."""
        return None if self.sasl_port is None else f"127.0.0.1:{self.sasl_port}"

    def _env(self, overrides: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["KAFKA_PORT"] = str(self.port)
        if self.controller_port is not None:
            env["KAFKA_CONTROLLER_PORT"] = str(self.controller_port)
        else:
            env.pop("KAFKA_CONTROLLER_PORT", None)
        if self.data_dir is not None:
            env["KAFKA_DATA_DIR"] = str(Path(self.data_dir).resolve())
        else:
            env.pop("KAFKA_DATA_DIR", None)
        if self.version is not None:
            env["KAFKA_VERSION"] = self.version
        if self.sasl_port is not None:
            env["KAFKA_SASL_PORT"] = str(self.sasl_port)
            if self.sasl_users is not None:
                env["KAFKA_SASL_USERS"] = ",".join(f"{n}:{p}" for n, p in self.sasl_users.items())
        else:
            env.pop("KAFKA_SASL_PORT", None)
            env.pop("KAFKA_SASL_USERS", None)
        # Probe with this interpreter: it is the one that has aiokafka.
        env.setdefault("TIERSTREAM_PYTHON", sys.executable)
        env.update(self.extra_env)
        env.update(overrides or {})
        return env

    def _run(
        self, action: str, timeout: float, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                ["bash", str(kafka_script()), action],
                env=self._env(env),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode()
            raise BrokerError(action, -1, f"timed out after {timeout}s\n{out}") from exc

    def start(self, timeout: float = 90) -> str:
        """Start the broker (fetching jars on first use) and wait until it
        answers; returns :attr:`bootstrap_servers`. A no-op if already up."""
        # The script enforces `timeout` for readiness; the extra margin covers
        # a first-time jar download and JVM start for the format step.
        self.reused = self.status()
        proc = self._run(
            "start",
            timeout=timeout + 300,
            env={"KAFKA_START_TIMEOUT": str(max(round(timeout), 1))},
        )
        if proc.returncode != 0:
            raise BrokerError("start", proc.returncode, proc.stdout)
        return self.bootstrap_servers

    def stop(self) -> None:
        """Stop the broker (SIGTERM, SIGKILL after 30 s); a no-op if stopped."""
        proc = self._run("stop", timeout=120)
        if proc.returncode != 0:
            raise BrokerError("stop", proc.returncode, proc.stdout)

    def status(self) -> bool:
        """True if the broker process for this port/data dir is alive."""
        return self._run("status", timeout=30).returncode == 0

    def pid(self) -> int | None:
        """The broker JVM's pid (from the script's pid file), None if unknown; with a
        ``data_dir`` only (the script's default directory is its own business)."""
        if self.data_dir is None:
            return None
        try:
            return int((Path(self.data_dir) / "kafka.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def clean(self) -> None:
        """Stop the broker and delete its data dir."""
        proc = self._run("clean", timeout=120)
        if proc.returncode != 0:
            raise BrokerError("clean", proc.returncode, proc.stdout)

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m streams.broker {wait,start,stop,status}``."""
    parser = argparse.ArgumentParser(prog="python -m streams.broker", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    wait = sub.add_parser("wait", help="wait until a broker answers a metadata request")
    wait.add_argument("--bootstrap", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    wait.add_argument("--timeout", type=float, default=90.0)

    env_sasl_port = os.environ.get("KAFKA_SASL_PORT", "")
    for name, text in (
        ("start", "start the local broker and wait for it"),
        ("stop", "stop the local broker"),
        ("status", "exit 0 if the local broker is running"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--port", type=int, default=int(os.environ.get("KAFKA_PORT", "9092")))
        p.add_argument("--data-dir", type=Path, default=None)
        p.add_argument("--kafka-version", default=None)
        p.add_argument(
            "--sasl-port",
            type=int,
            default=env_sasl_port or None,  # a string default goes through type=int too
            help="also a SASL_PLAINTEXT listener here (users from KAFKA_SASL_USERS)",
        )
        if name == "start":
            p.add_argument("--timeout", type=float, default=90.0)

    args = parser.parse_args(argv)
    if args.command == "wait":
        started = time.monotonic()
        try:
            asyncio.run(wait_until_ready(args.bootstrap, args.timeout))
        except TimeoutError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"ready: {args.bootstrap} ({time.monotonic() - started:.1f}s)")
        return 0

    # The SASL users (KAFKA_SASL_USERS) reach kafka.sh through the environment.
    broker = LocalBroker(
        port=args.port,
        data_dir=args.data_dir,
        version=args.kafka_version,
        sasl_port=args.sasl_port,
    )
    try:
        if args.command == "start":
            print(broker.start(timeout=args.timeout))
            return 0
        if args.command == "stop":
            broker.stop()
            return 0
        proc = broker._run("status", timeout=30)
        print(proc.stdout.rstrip())
        return proc.returncode
    except BrokerError as exc:
        print(exc, file=sys.stderr)
        return exc.returncode if exc.returncode > 0 else 1


if __name__ == "__main__":
    sys.exit(main())

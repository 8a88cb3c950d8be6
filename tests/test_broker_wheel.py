"""`tierstream broker` from an installed wheel, not from the checkout.

The wheel is built from a copy of the source tree and installed into a fresh virtualenv
outside the checkout; every command runs from a directory outside the checkout too. The
new virtualenv gets its dependencies from this interpreter's site-packages through a
``.pth`` file (so nothing but the wheel is installed) but not the project's editable
install: that is wired up by a ``.pth`` file of its own, which Python only reads in a
site directory, not in a path a ``.pth`` adds.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

from streams.broker import REPO_ROOT, cache_dir, kafka_script

SCRIPT = "streams/broker_files/kafka.sh"
POM = "streams/broker_files/pom.xml"
# Not part of a source distribution; everything else in the tree is copied.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", ".cache", ".hypothesis", ".pytest_cache", ".ruff_cache", "__pycache__",
    "*.egg-info", "build", "dist", "results",
)


@dataclass
class Installed:
    wheel: Path
    venv: Path
    site_packages: Path
    cwd: Path  # outside the checkout, for every command

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "TIERSTREAM_CACHE"}}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env.update(extra)
        return env

    def run(self, *cmd: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(cmd), cwd=self.cwd, env=self.env(**env), capture_output=True, text=True,
            timeout=timeout, check=False,
        )

    def python(self, code: str, **env: str) -> list[str]:
        proc = self.run(str(self.venv / "bin" / "python"), "-c", code, **env)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()


def _can_build_offline() -> bool:
    """The wheel can be built with this interpreter's setuptools (no build isolation)."""
    try:
        major = int(metadata.version("setuptools").split(".")[0])
        metadata.version("wheel")
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return major >= 77  # pyproject's build-system requirement


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    # Built from a copy: an in-tree build would write build/ and *.egg-info into the checkout.
    src = root / "src"
    shutil.copytree(REPO_ROOT, src, ignore=_NOT_SOURCE)
    dist = root / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)]
    if _can_build_offline():
        build.insert(5, "--no-build-isolation")
    # Otherwise pip fetches setuptools and wheel for an isolated build (PyPI or its cache).
    proc = subprocess.run(build, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = dist.glob("tierstream-*.whl")

    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()
    site_packages = Path(purelib)
    ours = sysconfig.get_path("purelib")
    (site_packages / "_tierstream_test_deps.pth").write_text(f"{ours}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cwd = root / "elsewhere"
    cwd.mkdir()
    return Installed(wheel=wheel, venv=venv, site_packages=site_packages, cwd=cwd)


def test_wheel_contains_kafka_script_and_pom(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as whl:
        names = set(whl.namelist())
        assert {SCRIPT, POM} <= names
        # Byte for byte the checkout's files: there is one copy of each.
        assert whl.read(SCRIPT) == kafka_script().read_bytes()
        assert whl.read(POM) == kafka_script().with_name("pom.xml").read_bytes()
    for name in (SCRIPT, POM):
        assert (installed.site_packages / name).is_file()


def test_installed_package_resolves_script_in_site_packages(installed: Installed, tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    streams_init, script, cache = installed.python(
        "import streams, streams.broker as b; print(streams.__file__); print(b.kafka_script()); print(b.cache_dir())",
        XDG_CACHE_HOME=str(xdg),
    )
    site = installed.site_packages.resolve()
    for path in (Path(streams_init), Path(script)):
        assert path.resolve().is_relative_to(site), path
        assert not path.resolve().is_relative_to(REPO_ROOT), path
    assert Path(script) == site / SCRIPT
    assert (Path(script).parent / "pom.xml").is_file()
    # Outside a checkout the jars go to the user's cache directory, TIERSTREAM_CACHE first.
    assert Path(cache) == xdg / "tierstream"
    home = tmp_path / "home"
    env = {"HOME": str(home), "XDG_CACHE_HOME": ""}
    assert installed.run("bash", script, "cache-dir", **env).stdout.strip() == str(home / ".cache" / "tierstream")
    env["TIERSTREAM_CACHE"] = str(tmp_path / "mine")
    assert installed.run("bash", script, "cache-dir", **env).stdout.strip() == str(tmp_path / "mine")
    # In the checkout, the checkout's .cache (what `make install` and CI fill).
    if "TIERSTREAM_CACHE" not in os.environ:
        assert cache_dir() == REPO_ROOT / ".cache"


def test_installed_cli_runs_broker_commands(installed: Installed, tmp_path: Path) -> None:
    tierstream = str(installed.venv / "bin" / "tierstream")
    proc = installed.run(tierstream, "broker", "--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("start", "stop", "status"):
        assert command in proc.stdout
    # status runs the installed kafka.sh: nothing runs on this port in an empty cache.
    cache = tmp_path / "cache"
    port = _consecutive_free_ports()
    proc = installed.run(tierstream, "broker", "status", "--port", str(port), TIERSTREAM_CACHE=str(cache))
    assert (proc.returncode, proc.stdout.strip()) == (1, "stopped"), proc.stderr


def _consecutive_free_ports() -> int:
    """A port P with P and P + 1 free a moment ago (the CLI's controller port is P + 1)."""
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free ports")


@pytest.mark.e2e
@pytest.mark.skipif(
    bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS")),
    reason="KAFKA_BOOTSTRAP_SERVERS is set: an external broker is in use",
)
def test_installed_cli_starts_and_stops_a_broker(installed: Installed, tmp_path: Path) -> None:
    """The jars come from the checkout's cache (linked into a private cache), so nothing is
    downloaded when `make install` has fetched them; the data dir is in that private cache."""
    version = installed.run("bash", str(installed.site_packages / SCRIPT), "version").stdout.strip()
    jars = cache_dir() / f"kafka-{version}"
    if not (jars / ".fetch-complete").is_file():
        fetch = subprocess.run(["bash", str(kafka_script()), "fetch"], capture_output=True, text=True, timeout=600)
        assert fetch.returncode == 0, fetch.stderr
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / jars.name).symlink_to(jars, target_is_directory=True)

    tierstream = str(installed.venv / "bin" / "tierstream")
    port = _consecutive_free_ports()
    env = {"TIERSTREAM_CACHE": str(cache), "KAFKA_HEAP": "-Xmx512m -Xms128m"}
    try:
        proc = installed.run(tierstream, "broker", "start", "--port", str(port), timeout=180, **env)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.strip() == f"127.0.0.1:{port}"
        assert (cache / f"broker-{port}" / "server.properties").is_file()
        proc = installed.run(tierstream, "broker", "status", "--port", str(port), **env)
        assert (proc.returncode, proc.stdout.strip()) == (0, "running"), proc.stderr
    finally:
        proc = installed.run(tierstream, "broker", "stop", "--port", str(port), timeout=120, **env)
    assert proc.returncode == 0, proc.stderr
    proc = installed.run(tierstream, "broker", "status", "--port", str(port), **env)
    assert (proc.returncode, proc.stdout.strip()) == (1, "stopped"), proc.stderr

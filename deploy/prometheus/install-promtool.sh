#!/usr/bin/env bash
# Puts promtool (from Debian's prometheus package) at .cache/prometheus/promtool, for the
# tests that check /metrics and the alert rules. The package is downloaded and unpacked
# with apt-get/dpkg-deb, not installed: no Prometheus server is set up or started, and no
# root-owned file changes (but `apt-get update` when the package lists are empty).
# A promtool already on PATH is used as it is. Exits non-zero if promtool could not be
# had; `make test` goes on, and those tests are then skipped with the reason.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=.cache/prometheus
if command -v promtool >/dev/null 2>&1 || [ -x "$dest/promtool" ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg-deb >/dev/null 2>&1; then
    echo "install-promtool: no apt-get/dpkg-deb here; install promtool by hand" >&2
    exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 777 "$work"   # apt downloads as its own user where it can
(
    cd "$work"
    apt-get download prometheus >/dev/null 2>&1 || {
        # A fresh machine may have no package lists yet.
        apt-get update -qq >/dev/null 2>&1 || true
        apt-get download prometheus >/dev/null
    }
    dpkg-deb -x prometheus_*.deb root
)
mkdir -p "$dest"
install -m 0755 "$work/root/usr/bin/promtool" "$dest/promtool"
"$dest/promtool" --version | head -1

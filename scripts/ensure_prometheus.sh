#!/usr/bin/env bash
# Make `prometheus` and `promtool` available for tests/test_dashboards.py and
# tests/test_prometheus_live.py (both skip, saying why, when they are missing).
#
# Installs Debian's `prometheus` package when the binaries are not on PATH and we are
# root. The package's system service is never started: the live test runs its own
# server on a free loopback port with its own storage directory. Always exits 0; when
# it cannot install, it says why so the skip in the test output can be traced here.
set -u

have_both() {
    command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1
}

report() {
    echo "ensure_prometheus: prometheus=$(command -v prometheus || echo missing)" \
        "promtool=$(command -v promtool || echo missing)"
    if command -v prometheus >/dev/null 2>&1; then
        prometheus --version 2>&1 | head -n 1 | sed 's/^/ensure_prometheus: /'
    fi
}

if have_both; then
    report
    exit 0
fi

if [ "$(id -u)" != "0" ]; then
    echo "ensure_prometheus: not root (uid $(id -u)), cannot apt-get install prometheus;" \
        "the Prometheus tests will skip"
    report
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_prometheus: apt-get is not available; the Prometheus tests will skip"
    report
    exit 0
fi

# policy-rc.d answering 101 keeps Debian's maintainer scripts from starting the
# prometheus service during the install; it is removed again straight after.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && made_policy=1
fi

log=$(mktemp)
if apt-get update -qq >"$log" 2>&1 \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        prometheus >>"$log" 2>&1; then
    echo "ensure_prometheus: installed Debian's prometheus package"
else
    echo "ensure_prometheus: apt-get could not install prometheus; the Prometheus tests" \
        "will skip. Last lines of its output:"
    tail -n 5 "$log" | sed 's/^/ensure_prometheus:   /'
fi
rm -f "$log"
if [ "$made_policy" = "1" ]; then
    rm -f "$policy"
fi

# A service manager may still have started it (systemd-less containers do not).
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus >/dev/null 2>&1 || true
    echo "ensure_prometheus: stopped the prometheus system service the package started"
fi

report
exit 0

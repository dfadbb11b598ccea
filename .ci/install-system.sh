#!/usr/bin/env bash
# Debian packages the tests and the quick benchmark need. Idempotent; a no-op when
# everything is present, so developers without root can still run `make`.
set -euo pipefail
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
if [ "$(id -u)" -ne 0 ] && ((${#need[@]})); then
  echo "install-system: missing ${need[*]}; install them (Debian: apt-get install ${need[*]})" >&2
  exit 1
fi
# Optional: promtool and a private Prometheus for tests/test_monitoring.py,
# which skips without them. Installed where we can (CI runs as root).
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ]; then
    need+=(prometheus)
  else
    echo "install-system: prometheus not installed; tests/test_monitoring.py will skip (Debian: apt-get install prometheus)" >&2
  fi
fi
if ((${#need[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # The tests run private instances; no package may start its own service
  # (Debian's prometheus would, and keep port 9090). policy-rc.d exit 101
  # tells invoke-rc.d "not now"; one already in place is left as it is.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Where no policy-rc.d was honoured (systemd as init), stop what started.
  if [ -s /run/prometheus/prometheus.pid ]; then
    kill "$(cat /run/prometheus/prometheus.pid)" 2>/dev/null || true
  fi
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    systemctl stop prometheus || true
  fi
fi

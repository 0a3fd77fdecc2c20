#!/usr/bin/env bash
# Installs what pgstate's tests and examples need on a fresh Debian machine, when missing:
# the PostgreSQL server binaries (initdb, postgres, pg_basebackup), psql and pgbench, openssl,
# PgBouncer, tmux (the test of `pgstate watch`), and pg_auto_failover (pg_autoctl) for the
# server's major version.
# Idempotent and quiet when everything is there.
set -euo pipefail

have_server() {
  local d
  if command -v pg_config >/dev/null 2>&1; then
    d=$(pg_config --bindir 2>/dev/null || true)
    [ -x "$d/initdb" ] && [ -x "$d/postgres" ] && return 0
  fi
  for d in /usr/lib/postgresql/*/bin; do
    [ -x "$d/initdb" ] && [ -x "$d/postgres" ] && return 0
  done
  command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1
}

# Installs the Debian packages "$@" with apt-get (through sudo when not root).
apt_install() {
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "setup: need $* but am not root and have no sudo; install them and retry" >&2
      exit 1
    fi
  fi
  echo "setup: installing $* with apt-get" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

missing=()
have_server || missing+=(postgresql)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
command -v pgbench >/dev/null 2>&1 || missing+=(postgresql-client)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v setsid >/dev/null 2>&1 || missing+=(util-linux)
command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || missing+=(pgbouncer)
# A real terminal for the test of `pgstate watch`.
command -v tmux >/dev/null 2>&1 || missing+=(tmux)

if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  # Debian's package starts a default cluster on port 5432; the project starts its own servers.
  if command -v pg_lsclusters >/dev/null 2>&1; then
    pg_lsclusters -h 2>/dev/null | while read -r ver name _; do
      $sudo pg_ctlcluster "$ver" "$name" stop >/dev/null 2>&1 || true
    done
  fi
  # Likewise Debian's PgBouncer service: the tests start their own.
  $sudo service pgbouncer stop >/dev/null 2>&1 || true
fi
have_server || { echo "setup: PostgreSQL server binaries still not found" >&2; exit 1; }

# pg_auto_failover, built for the installed server's major version (Debian's
# postgresql-<major>-auto-failover: the monitor's extension and pg_autoctl); its own service
# is not used: the tests run pg_autoctl themselves.
major=""
if command -v pg_config >/dev/null 2>&1; then
  major=$(pg_config --version 2>/dev/null | sed -n 's/^PostgreSQL \([0-9][0-9]*\).*/\1/p')
fi
if [ -z "$major" ]; then
  major=$(ls /usr/lib/postgresql 2>/dev/null | sort -n | tail -1)
fi
if ! command -v pg_autoctl >/dev/null 2>&1 || [ ! -f "/usr/lib/postgresql/$major/lib/pgautofailover.so" ]; then
  apt_install "postgresql-$major-auto-failover"
fi

#!/usr/bin/env bash
# What the team-stack tests (tests/test_team_stack.py) need that pip cannot install: PostgreSQL's
# server binaries (initdb, pg_ctl, postgres). Idempotent: installs Debian's `postgresql` only when
# initdb is missing, and says what it did. .ci/run calls it before `make test`; without it those
# tests skip with a reason (a laptop), in CI they run. The tests start their own throwaway cluster
# on 127.0.0.1 (as `nobody` when run as root), so the package's own cluster is never used.
set -euo pipefail

find_initdb() {
  command -v initdb 2>/dev/null && return 0
  # Debian keeps the server binaries off PATH, one directory per major version; take the newest.
  local found
  found=$(find /usr/lib/postgresql -path '*/bin/initdb' 2>/dev/null | sort -V | tail -n 1)
  [[ -n $found ]] && echo "$found"
}

if initdb=$(find_initdb); then
  echo "ci-services: PostgreSQL present: $("$initdb" --version) ($initdb)"
else
  if ! command -v apt-get >/dev/null; then
    echo "ci-services: initdb not found and no apt-get: install PostgreSQL's server binaries yourself" >&2
    exit 1
  fi
  sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "ci-services: installing postgresql needs root (or sudo)" >&2; exit 1; }
    sudo=(sudo)
  fi
  echo "ci-services: initdb not found: installing Debian's postgresql with apt-get"
  "${sudo[@]}" apt-get update -q
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends postgresql
  initdb=$(find_initdb) || { echo "ci-services: postgresql installed but initdb still not found" >&2; exit 1; }
  echo "ci-services: installed $("$initdb" --version) ($initdb)"
fi

# Postgres refuses to run as root: as root, the tests run it as `nobody` through runuser (util-linux).
if [[ $(id -u) -eq 0 ]] && ! command -v runuser >/dev/null; then
  echo "ci-services: running as root but runuser is missing: the PostgreSQL tests will skip" >&2
  exit 1
fi

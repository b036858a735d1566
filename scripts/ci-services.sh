#!/usr/bin/env bash
# What the integration tests need that pip cannot install, from Debian's packages:
#   - PostgreSQL's server binaries (initdb, pg_ctl, postgres) for tests/test_team_stack.py, which start
#     their own throwaway cluster on 127.0.0.1 (as `nobody` when run as root);
#   - Chromium for the MLflow UI browser check in tests/test_serving.py.
# Idempotent: installs a package only when its binary is missing, and says what it did. .ci/run calls
# it before `make test`; without it those tests skip with a reason (a laptop), in CI they run.
set -euo pipefail

find_initdb() {
  command -v initdb 2>/dev/null && return 0
  # Debian keeps the server binaries off PATH, one directory per major version; take the newest.
  local found
  found=$(find /usr/lib/postgresql -path '*/bin/initdb' 2>/dev/null | sort -V | tail -n 1)
  [[ -n $found ]] && echo "$found"
}

find_chromium() {
  command -v chromium 2>/dev/null || command -v chromium-browser 2>/dev/null
}

updated=0
apt_install() {  # apt_install PACKAGE...
  if ! command -v apt-get >/dev/null; then
    echo "ci-services: no apt-get: install $* yourself" >&2
    exit 1
  fi
  local sudo=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "ci-services: installing $* needs root (or sudo)" >&2; exit 1; }
    sudo=(sudo)
  fi
  echo "ci-services: installing Debian's $* with apt-get"
  if [[ $updated == 0 ]]; then
    "${sudo[@]}" apt-get update -q
    updated=1
  fi
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "$@"
}

if ! initdb=$(find_initdb); then
  apt_install postgresql
  initdb=$(find_initdb) || { echo "ci-services: postgresql installed but initdb still not found" >&2; exit 1; }
fi
echo "ci-services: PostgreSQL: $("$initdb" --version) ($initdb)"

if ! chromium=$(find_chromium); then
  apt_install chromium
  chromium=$(find_chromium) || { echo "ci-services: chromium installed but not on PATH" >&2; exit 1; }
fi
echo "ci-services: Chromium: $("$chromium" --version 2>/dev/null) ($chromium)"

# Postgres refuses to run as root: as root, the tests run it as `nobody` through runuser (util-linux).
if [[ $(id -u) -eq 0 ]] && ! command -v runuser >/dev/null; then
  echo "ci-services: running as root but runuser is missing: the PostgreSQL tests will skip" >&2
  exit 1
fi

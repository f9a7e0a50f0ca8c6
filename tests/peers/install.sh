#!/usr/bin/env bash
# Installs what the test peers need (DESIGN.md §4): dovecot, postfix and postgresql from Debian, Radicale in
# a Python venv and oidc-provider from npm, the last two under DEPS (default target/peer-deps);
# and, for tests/python_client.rs, a venv with the Python client's build and runtime
# dependencies, so that no test fetches anything from a registry.
# Idempotent: installs only what is missing. Needs root for apt-get.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
DEPS=${PEERS_DEPS:-$REPO/target/peer-deps}
log() { echo "peers: $*" >&2; }

pkgs=()
command -v dovecot >/dev/null || pkgs+=(dovecot-imapd dovecot-lmtpd)
command -v postfix >/dev/null || {
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  pkgs+=(postfix)
}
command -v openssl >/dev/null || pkgs+=(openssl)
command -v node >/dev/null || pkgs+=(nodejs npm)
# python3-venv also serves the Python client's venv below.
python3 -c 'import venv, ensurepip' 2>/dev/null || pkgs+=(python3-venv)
command -v systemd-analyze >/dev/null || pkgs+=(systemd)
# tests/support/postgres.rs runs initdb, pg_ctl and postgres from /usr/lib/postgresql/<ver>/bin.
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || pkgs+=(postgresql)
if [ ${#pkgs[@]} -gt 0 ]; then
  log "installing ${pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi
# Debian starts the system instances; the tests run their own on other ports.
for svc in dovecot postfix postgresql; do
  command -v systemctl >/dev/null && systemctl stop "$svc" 2>/dev/null || true
done

mkdir -p "$DEPS"
if [ ! -x "$DEPS/venv/bin/radicale" ]; then
  log "installing radicale into $DEPS/venv"
  python3 -m venv "$DEPS/venv"
  "$DEPS/venv/bin/pip" install -q 'radicale>=3.2,<4'
fi
if [ ! -d "$DEPS/oauth/node_modules/oidc-provider" ]; then
  log "installing oidc-provider into $DEPS/oauth"
  mkdir -p "$DEPS/oauth"
  (cd "$DEPS/oauth" && { [ -f package.json ] || npm init -y >/dev/null; } && npm install -s 'oidc-provider@9' >/dev/null)
fi
# The Python client's requirements, read from its pyproject.toml (build-system and project), so
# its pins have one home. tests/python_client.rs builds clients/python with this venv offline.
if [ ! -x "$DEPS/python-client/bin/python" ]; then
  log "creating $DEPS/python-client"
  python3 -m venv "$DEPS/python-client"
fi
mapfile -t pyreqs < <("$DEPS/python-client/bin/python" -c '
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    d = tomllib.load(f)
print("\n".join(d["build-system"]["requires"] + d["project"]["dependencies"]))
' "$REPO/clients/python/pyproject.toml")
"$DEPS/python-client/bin/pip" install -q --disable-pip-version-check "${pyreqs[@]}"
log "installed under $DEPS"

#!/bin/sh
# Installs what edgecdn needs on a fresh Debian 12 machine: the node's own packages (Caddy,
# OpenSSH, rsync - the versions a Debian 12 node gets), shellcheck, and a Python venv in .venv.
set -eu
cd "$(dirname "$0")/.."

packages="caddy openssh-server openssh-client rsync openssl curl shellcheck python3-venv"
missing=""
for p in $packages; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  as_root=""
  [ "$(id -u)" -eq 0 ] || as_root="sudo"
  $as_root apt-get update -q
  # shellcheck disable=SC2086 # one word per package
  DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -q --no-install-recommends $missing
fi
# Debian starts the packaged Caddy and sshd as services where it can; the lab runs its own.

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt

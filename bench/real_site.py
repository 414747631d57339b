"""A real site's one-file redeploy to a lab, timed: the Rust docs, Python's docs, a blog.

    .venv/bin/python -m bench.real_site --site /usr/share/doc/rust-doc/html [--nodes 3]

Copies the site with its links followed (as `cp -rL` would), deploys it to a fresh lab with an
empty cache (so every compressed sibling is made once), changes one page, deploys again, and
prints both times, the files and bytes each node was sent, and site_sync's peak memory.
Debian packages real sites: `rust-doc` (the Rust docs), `python3-doc` (Python's).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lab as lab_module

ROOT = Path(__file__).resolve().parents[1]


def deploy(description: dict[str, object], site: Path, env: dict[str, str]) -> tuple[float, dict[str, object]]:
    """One `site_sync deploy` process (as `pulumi up` runs it): its seconds and JSON report."""
    handoff = lab_module.handoff_document(description, site)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "site_sync", "deploy", "--handoff", "-", "--json"],
        input=handoff, capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"deploy of {site} failed:\n{result.stderr[-3000:]}")
    return seconds, json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--site", type=Path, required=True)
    parser.add_argument("--nodes", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgecdn-real-site-"))
    try:
        v1, v2 = work / "v1", work / "v2"
        shutil.copytree(args.site, v1, symlinks=False)
        shutil.copytree(v1, v2)
        page = next(p for p in sorted(v2.rglob("*.html")) if p.stat().st_size > 1000)
        page.write_bytes(page.read_bytes().replace(b"<body", b"<!-- changed --><body", 1))
        files = sum(1 for p in v1.rglob("*") if p.is_file())
        size = sum(p.stat().st_size for p in v1.rglob("*") if p.is_file())
        print(f"site: {args.site}, {files} files, {size / 1e6:.0f} MB; changed: {page.relative_to(v2)}")
        env = {**os.environ, "EDGECDN_CACHE_DIR": str(work / "cache")}
        description = lab_module.up(work / ".lab", nodes=args.nodes, site_dir=None, base=None, log=lambda _: None)
        try:
            for name, site in (("first deploy (cold cache)", v1), ("one page changed", v2)):
                seconds, report = deploy(description, site, env)
                nodes = report["nodes"]
                assert isinstance(nodes, dict)
                sent = {n["files_sent"] for n in nodes.values()}
                sent_bytes = max(n["bytes_sent"] for n in nodes.values())
                print(f"{name}: {seconds:.1f} s, files sent per node {sent}, at most {sent_bytes / 1e3:.0f} KB")
            # Before `down`: the lab's servers, reaped there, would count too.
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            print(f"site_sync peak memory (largest process waited for): {peak:.0f} MB")
        finally:
            lab_module.down(work / ".lab")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

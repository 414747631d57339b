"""Reading a site: every problem reported at once before any node is touched, caches that hold."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from edgecdn.contract import MAX_RELEASE_BYTES, content_mtime
from site_sync.build import prepare_release
from site_sync.cache import Cache, open_cache
from site_sync.release import SiteError, check_limits, scan_site


def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    (root / "docs").mkdir(parents=True)
    (root / "index.html").write_text("<h1>home</h1>" * 50)
    (root / "docs" / "page.html").write_text("<p>page</p>" * 50)
    return root


def test_symlinks_inside_the_site_are_published_as_their_targets(tmp_path):
    root = site(tmp_path)
    (root / "latest").symlink_to("docs")
    (root / "alias.html").symlink_to("docs/page.html")
    files = {f.path: f for f in scan_site(root).files}
    assert set(files) == {"index.html", "docs/page.html", "latest/page.html", "alias.html"}
    assert files["alias.html"].sha256 == files["docs/page.html"].sha256


def test_every_unpublishable_path_is_listed_in_one_message(tmp_path):
    root = site(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not part of the site")
    for i in range(3):
        (root / f"ext{i}").symlink_to(outside)
    (root / "dangling.html").symlink_to("nowhere.html")
    os.mkfifo(root / "pipe")
    (root / "loop").symlink_to(".")
    (root / "bad\\name.html").write_text("x")
    (root / ".well-known" / "edgecdn").mkdir(parents=True)
    (root / ".well-known" / "edgecdn" / "health").write_text("forged")
    with pytest.raises(SiteError) as info:
        scan_site(root)
    message = str(info.value)
    assert message.startswith("8 paths in ")
    for expected in (
        "ext0: a symbolic link to",
        "ext2: a symbolic link to",
        "dangling.html: a symbolic link to nowhere.html, which does not exist",
        "pipe: a FIFO",
        "loop/: a symbolic link loop",
        "control character or backslash",
        "which the nodes answer themselves",
        "cp -rL",
        "--follow-external-symlinks",
    ):
        assert expected in message, expected


def test_external_symlinks_are_followed_only_on_request(tmp_path):
    root = site(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shared.css").write_text("body{}")
    (root / "shared").symlink_to(outside)
    with pytest.raises(SiteError, match="outside the site"):
        scan_site(root)
    assert "shared/shared.css" in {f.path for f in scan_site(root, follow_external=True).files}


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_named(tmp_path):
    root = site(tmp_path)
    (root / "private.html").write_text("x")
    (root / "private.html").chmod(0)
    with pytest.raises(SiteError, match=r"private\.html: cannot be read"):
        scan_site(root)


def test_names_differing_only_in_case_are_warned_about(tmp_path):
    root = site(tmp_path)
    (root / "Page.html").write_text("a")
    (root / "page.html").write_text("b")
    assert scan_site(root).warnings == [
        "Page.html and page.html differ only in case: a case-insensitive disk (macOS, Windows) keeps one of them"
    ]


def test_a_site_over_the_nodes_limits_is_refused_saying_by_how_much():
    with pytest.raises(SiteError, match="the site has 150000 files; a node takes 133333"):
        check_limits(150_000, 1)
    with pytest.raises(SiteError, match=f"the site is {MAX_RELEASE_BYTES + 5} bytes, 5 over"):
        check_limits(10, MAX_RELEASE_BYTES + 5)


def test_hashes_are_cached_by_stat_and_redone_when_a_file_changes(tmp_path):
    root = site(tmp_path)
    with open_cache(tmp_path / "cache") as cache:
        first = scan_site(root, cache).release_id
    page = root / "docs" / "page.html"
    with open_cache(tmp_path / "cache") as cache:
        known = cache.known_hashes("/")
        assert Cache.stat_key(page.stat()) == known[str(page)][0]
        # Same size and mtime, new content: the ctime and inode still tell.
        stat = page.stat()
        time.sleep(0.01)
        page.write_text("<p>PAGE</p>" * 50)
        os.utime(page, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert scan_site(root, cache).release_id != first


def test_compressed_siblings_are_made_once_per_content(tmp_path, monkeypatch):
    import site_sync.build as build

    root = site(tmp_path)
    calls: list[int] = []
    real = build._compress
    monkeypatch.setattr(build, "_compress", lambda data: calls.append(len(data)) or real(data))
    with open_cache(tmp_path / "cache") as cache:
        release = prepare_release(scan_site(root, cache), cache)
        assert len(calls) == 2 and {"index.html.br", "docs/page.html.gz"} <= {e["path"] for e in release.entries}
        (root / "copy.html").write_text((root / "index.html").read_text())
        again = prepare_release(scan_site(root, cache), cache)
    assert len(calls) == 2, "unchanged and copied contents are never compressed again"
    assert {e["path"] for e in again.entries} >= {"copy.html.br", "copy.html.gz"}


def test_modification_times_come_from_content_and_lie_in_the_past():
    times = {content_mtime(f"{i:064x}") for i in range(1000)} | {content_mtime("f" * 64)}
    assert all(100_000_000 <= t < time.time() - 10 * 365 * 86400 for t in times)
    assert content_mtime("ab" * 32) == content_mtime("ab" * 32)


def test_progress_is_a_live_table_on_a_terminal_and_plain_lines_elsewhere(tmp_path):
    import io
    import pty

    from site_sync.progress import LiveProgress, PlainProgress, progress_for

    plain = io.StringIO()
    progress = progress_for(plain)
    assert isinstance(progress, PlainProgress)
    progress.node("eu", "staged")
    progress.log("done")
    lines = plain.getvalue().splitlines()
    assert lines[0].endswith("] eu: staged") and lines[1].endswith("] done")
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as terminal:
        live = progress_for(terminal)
        assert isinstance(live, LiveProgress)
        live.node("eu", "uploading 3 files")
        live.close()
    os.close(leader)

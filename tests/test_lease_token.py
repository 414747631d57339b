"""The deploy lease token a machine keeps until every node it leased has let go of it."""

from __future__ import annotations

import itertools
from pathlib import Path

from site_sync.cache import lease_token


def _tokens():
    counter = itertools.count()
    return lambda: f"{next(counter):032x}"


def test_a_deploy_that_could_not_end_a_lease_hands_its_token_to_the_next(tmp_path: Path):
    new = _tokens()
    with lease_token(tmp_path, new) as (first, settle):
        settle(False)  # a node went away before its lease could be ended
    with lease_token(tmp_path, new) as (second, settle):
        assert second == first, "the next deploy from this machine carries on with that lease"
        settle(True)
    with lease_token(tmp_path, new) as (third, _):
        assert third != first, "once every lease ended, a new deploy gets a new token"
    assert (tmp_path / "lease-token").stat().st_mode & 0o077 == 0


def test_a_deploy_running_meanwhile_on_the_same_machine_gets_its_own_token(tmp_path: Path):
    new = _tokens()
    with lease_token(tmp_path, new) as (running, _), lease_token(tmp_path, new) as (meanwhile, settle):
        assert meanwhile != running, "so the nodes tell it they are busy, as they would anyone else"
        settle(True)
    with lease_token(tmp_path, new) as (later, _):
        assert later == running, "the one that held the lock kept its token"

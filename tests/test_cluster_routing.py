"""Which replica the Ray ingress picks: conversation affinity by rendezvous hashing, the least busy otherwise."""

from __future__ import annotations

import pytest

pytest.importorskip("ray.serve", reason="needs the ray extra: pip install 'gemmakit[ray]'")

from gemmakit.cluster.router import pick_replica, rendezvous_score  # noqa: E402

REPLICAS = ["r-a", "r-b", "r-c", "r-d"]


def _home(key: str, replicas: list[str]) -> str:
    return max(replicas, key=lambda r: rendezvous_score(key, r))


def test_a_key_goes_home_and_only_the_removed_replicas_keys_move():
    keys = [f"chat:{i}" for i in range(400)]
    idle = dict.fromkeys(REPLICAS, 0)
    homes = {k: pick_replica(idle, k) for k in keys}
    assert all(homes[k] == _home(k, REPLICAS) for k in keys)
    assert set(homes.values()) == set(REPLICAS)  # 400 keys spread over all four (each ~100)
    after = {k: pick_replica({r: 0 for r in REPLICAS if r != "r-c"}, k) for k in keys}
    moved = [k for k in keys if after[k] != homes[k]]
    assert moved and all(homes[k] == "r-c" for k in moved)


def test_a_busy_home_gives_way_to_the_least_busy_past_the_imbalance():
    key = "session:user-7"
    home = _home(key, REPLICAS)
    loads = dict.fromkeys(REPLICAS, 2)
    loads[home] = 6  # 4 more than the least busy: still home
    assert pick_replica(loads, key, imbalance=4) == home
    loads[home] = 7
    loads["r-b" if home != "r-b" else "r-a"] = 1
    assert pick_replica(loads, key, imbalance=4) == ("r-b" if home != "r-b" else "r-a")


def test_no_key_takes_the_least_busy_and_avoid_steers_away():
    loads = {"r-a": 3, "r-b": 1, "r-c": 2}
    assert pick_replica(loads, None) == "r-b"
    assert pick_replica(loads, None, avoid={"r-b"}) == "r-c"
    key = "prompt:x"
    home = _home(key, list(loads))
    assert pick_replica(loads, key, avoid={home}) != home
    # When every replica is to be avoided, one is still picked (a retry beats a refusal).
    assert pick_replica(loads, None, avoid=set(loads)) == "r-b"
    assert pick_replica({}, "k") is None

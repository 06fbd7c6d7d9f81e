"""The Redis keyspace helpers (pure): one hash slot per stream, no collisions whatever ids and users hold."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.broker.redis.keys import Keys, consumer_tag, end_entry_id, entry_ordinal, event_entry_id

KEYS = Keys("gw:")


def hash_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes (the first `{...}`)."""
    start = key.index("{")
    return key[start + 1:key.index("}", start)]


def test_every_key_of_a_stream_shares_its_hash_slot() -> None:
    resource = "evaluations/e:1"
    keys = [KEYS.stream(resource), KEYS.lease(resource), KEYS.fence(resource), KEYS.poll(resource),
            KEYS.exclusive("alice", resource), KEYS.decision("alice", resource)]
    assert {hash_tag(k) for k in keys} == {resource}
    assert len(set(keys)) == len(keys)
    assert all(k.startswith("gw:") for k in keys)


def test_colons_in_resources_and_consumers_cannot_collide() -> None:
    assert KEYS.exclusive("b:c", "evaluations/a") != KEYS.exclusive("c", "evaluations/a:b")
    assert KEYS.decision("b:c", "evaluations/a") != KEYS.decision("c", "evaluations/a:b")
    assert KEYS.exclusive("x}", "evaluations/a") .count("}") == 1


@given(st.text(max_size=50), st.text(max_size=50))
def test_consumer_tags_are_fixed_size_and_distinct(a: str, b: str) -> None:
    ta, tb = consumer_tag(a), consumer_tag(b)
    assert len(ta) == len(tb) == 24
    assert ":" not in ta and "{" not in ta and "}" not in ta
    assert (ta == tb) == (a == b)


def test_entry_ids_are_positions() -> None:
    assert event_entry_id(7) == "7-0" and end_entry_id(7) == "7-1"
    assert entry_ordinal("7-0") == entry_ordinal("7-1") == 7
    assert entry_ordinal("\u00b2-0") == 0 and entry_ordinal("") == 0

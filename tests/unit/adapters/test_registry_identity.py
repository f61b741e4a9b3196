"""The reader's rule for believing a registry: emptied and rolled-back stores are refused."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lorafleet.adapters.registry.identity import (
    NO_ID,
    RegistryIdentity,
    RegistryTrust,
    decide_registry_trust,
)

A, B, C = "reg-a", "reg-b", "reg-c"


def read(*identities: RegistryIdentity) -> RegistryTrust:
    state = RegistryTrust()
    for seen in identities:
        state = decide_registry_trust(state, seen)
    return state


def test_growing_generation_is_trusted_and_remembered() -> None:
    state = read(RegistryIdentity(A, 3), RegistryIdentity(A, 9))
    assert state.trusted and state.known == RegistryIdentity(A, 9)


def test_an_emptied_store_is_a_reset_not_an_empty_registry() -> None:
    state = read(RegistryIdentity(A, 40), RegistryIdentity(None, 0))
    assert state.refused == "reset"
    assert state.known == RegistryIdentity(A, 40)  # what it knew is kept
    # The first write into the empty store gives it a new id: still not the known registry.
    assert read(RegistryIdentity(A, 40), RegistryIdentity(None, 0), RegistryIdentity(B, 1)).refused == "reset"


def test_an_older_snapshot_is_a_rollback_and_stays_refused_when_it_catches_up() -> None:
    state = read(RegistryIdentity(A, 40), RegistryIdentity(A, 35))
    assert state.refused == "rolled_back"
    # Writers push the restored store past the remembered generation: the keys revoked after
    # the snapshot are still live in it, so the refusal must not lift by itself.
    state = decide_registry_trust(state, RegistryIdentity(A, 41))
    assert state.refused == "rolled_back" and state.known == RegistryIdentity(A, 40)


def test_an_accepted_restore_is_adopted_by_every_reader_that_knew_an_old_id() -> None:
    accepted = RegistryIdentity(C, 36, frozenset({A, B, NO_ID}))
    for history in ([RegistryIdentity(A, 40), RegistryIdentity(A, 35)],  # refused first
                    [RegistryIdentity(A, 40)],  # never noticed
                    [RegistryIdentity(B, 2)],  # a reader that had adopted the wrong store
                    [RegistryIdentity(None, 5), RegistryIdentity(None, 1)]):  # id-less store
        state = decide_registry_trust(read(*history), accepted)
        assert state.trusted and state.known == accepted, history
    # A restore that does not name the known id changes nothing.
    assert decide_registry_trust(read(RegistryIdentity(A, 40)),
                                 RegistryIdentity(C, 50, frozenset({B}))).refused == "reset"


def test_a_store_first_seen_before_its_first_write_may_get_an_id() -> None:
    assert read(RegistryIdentity(None, 0), RegistryIdentity(A, 1)).trusted
    assert read(RegistryIdentity(None, 7), RegistryIdentity(A, 3)).refused == "rolled_back"


@given(st.lists(st.tuples(st.sampled_from([A, B, None]), st.integers(0, 50)), min_size=1))
def test_once_refused_only_an_accepted_restore_lifts_it(seq: list[tuple[str | None, int]]) -> None:
    """Invariant: no sequence of plain identities (no lineage) turns a refusal back into trust."""
    state = read(RegistryIdentity(A, 25), RegistryIdentity(None, 0))
    for registry_id, gen in seq:
        state = decide_registry_trust(state, RegistryIdentity(registry_id, gen))
        assert not state.trusted
        assert state.known == RegistryIdentity(A, 25)

"""Pure reconcile decisions: the adapter lifecycle, placement, key sync, conditions."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.operator import decisions
from lorafleet.operator.decisions import (
    Action,
    AdapterSpec,
    AdapterStatus,
    Observed,
    Phase,
    PlacementMode,
    ServingAdapter,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
SPEC = AdapterSpec(tenant="alice", name="sql", base_model="base", uri="/a/sql")


def served(spec: AdapterSpec = SPEC, replicas: tuple[str, ...] = (), *,
           source: str | None = None, base_model: str | None = None) -> ServingAdapter:
    return ServingAdapter(adapter_id=f"{spec.tenant}/{spec.name}@0123456789ab",
                          source=source if source is not None else decisions.source_ref(spec),
                          base_model=base_model or spec.base_model, digest="0123456789ab" * 5,
                          size_bytes=10, replicas=replicas)


def test_unknown_adapter_is_registered() -> None:
    d = decisions.decide_adapter_action(SPEC, AdapterStatus(), Observed(None, replica_count=2))
    assert (d.action, d.phase) == (Action.REGISTER, Phase.FETCHING)


def test_registered_on_too_few_replicas_is_loaded() -> None:
    d = decisions.decide_adapter_action(SPEC, AdapterStatus(), Observed(served(replicas=("r0",)), 3))
    assert (d.action, d.wanted) == (Action.LOAD, 3)


def test_ready_once_serving_holds_it_on_the_wanted_replicas() -> None:
    d = decisions.decide_adapter_action(SPEC, AdapterStatus(), Observed(served(replicas=("r0", "r1")), 2))
    assert (d.action, d.phase) == (Action.READY, Phase.READY)


def test_no_serving_replica_waits_instead_of_ready() -> None:
    d = decisions.decide_adapter_action(SPEC, AdapterStatus(), Observed(served(), replica_count=0))
    assert d.action is Action.WAIT and d.phase is Phase.LOADING and d.delay


def test_failed_generation_is_not_retried_until_the_spec_changes() -> None:
    status = AdapterStatus(phase=Phase.FAILED, failed_generation=1)
    assert decisions.decide_adapter_action(SPEC, status, Observed(None, 2)).action is Action.FAIL
    newer = replace(SPEC, generation=2)
    assert decisions.decide_adapter_action(newer, status, Observed(None, 2)).action is Action.REGISTER


def test_wrong_base_model_is_rejected_with_both_names() -> None:
    d = decisions.decide_adapter_action(SPEC, AdapterStatus(),
                              Observed(served(base_model="gpt2", replicas=("r0",)), 1))
    assert d.action is Action.REJECT and d.phase is Phase.FAILED
    assert "gpt2" in d.message and "base" in d.message


def test_new_revision_is_registered_again() -> None:
    old = replace(SPEC, uri="hf://org/a", revision="v1")
    new = replace(old, revision="v2", generation=2)
    status = AdapterStatus(registered_source=decisions.source_key(old))
    d = decisions.decide_adapter_action(new, status, Observed(served(old, ("r0",)), 1))
    assert (d.action, d.reason) == (Action.REGISTER, "SourceChanged")
    assert decisions.source_ref(new) == "hf://org/a@v2"


def test_revision_of_non_hf_source_still_rolls() -> None:
    old = replace(SPEC, uri="s3://b/a", revision="1")
    new = replace(old, revision="2")
    assert decisions.source_ref(old) == decisions.source_ref(new) == "s3://b/a"
    assert decisions.source_key(old) != decisions.source_key(new)
    status = AdapterStatus(registered_source=decisions.source_key(old))
    d = decisions.decide_adapter_action(new, status, Observed(served(old, ("r0",)), 1))
    assert d.action is Action.REGISTER


def test_serving_normalising_the_source_does_not_loop() -> None:
    status = AdapterStatus(registered_source=decisions.source_key(SPEC))
    d = decisions.decide_adapter_action(SPEC, status,
                              Observed(served(source="file:///a/sql", replicas=("r0",)), 1))
    assert d.action is Action.READY


@pytest.mark.parametrize(("mode", "replicas", "count", "wanted"), [
    (PlacementMode.ALL, None, 3, 3),
    (PlacementMode.REPLICAS, 2, 3, 2),
    (PlacementMode.REPLICAS, 5, 3, 3),
    (PlacementMode.DEMAND, None, 3, 1),
    (PlacementMode.ALL, None, 0, 0),
])
def test_wanted_replicas(mode: PlacementMode, replicas: int | None, count: int,
                         wanted: int) -> None:
    assert decisions.wanted_replicas(replace(SPEC, mode=mode, replicas=replicas), count) == wanted


def test_cleanup_unregisters_until_serving_forgets() -> None:
    assert decisions.decide_cleanup(Observed(served(), 1)).action is Action.UNREGISTER
    assert decisions.decide_cleanup(Observed(None, 1)).action is Action.DONE


def test_parse_spec_defaults_and_errors() -> None:
    spec = decisions.parse_adapter_spec("sql", {"tenant": "alice", "baseModel": "b",
                                      "source": {"uri": "/x", "secretRef": {"name": "creds"}}}, 4)
    assert (spec.name, spec.mode, spec.secret_ref, spec.generation) == (
        "sql", PlacementMode.ALL, "creds", 4)
    with pytest.raises(ValueError, match="adapterName"):
        decisions.parse_adapter_spec("x" * 70, {"tenant": "alice", "baseModel": "b", "source": {"uri": "/x"}})
    with pytest.raises(ValueError, match="replicas"):
        decisions.parse_adapter_spec("a", {"tenant": "alice", "baseModel": "b", "source": {"uri": "/x"},
                                 "placement": {"mode": "replicas"}})


def test_key_changes_add_missing_and_revoke_removed_or_rehashed() -> None:
    plan = decisions.decide_key_changes({"k1": "h1", "k2": "h2new", "k4": "h4"},
                              {"k1": "h1", "k2": "h2", "k3": "h3"})
    assert dict(plan.add) == {"k2": "h2new", "k4": "h4"}
    assert plan.revoke == ("k2", "k3")


def test_condition_transition_time_moves_only_on_flip() -> None:
    first = decisions.set_condition([], type_="Ready", status=False, reason="a", message="m",
                          generation=1, now=NOW)
    same = decisions.set_condition(first, type_="Ready", status=False, reason="b", message="m2",
                         generation=2, now=NOW + timedelta(minutes=5))
    flipped = decisions.set_condition(same, type_="Ready", status=True, reason="c", message="m3",
                            generation=2, now=NOW + timedelta(minutes=9))
    assert same[0]["lastTransitionTime"] == first[0]["lastTransitionTime"]
    assert same[0]["reason"] == "b" and same[0]["observedGeneration"] == 2
    assert flipped[0]["lastTransitionTime"] == "2026-11-25T12:09:00Z"


def test_failed_status_clears_replicas_and_records_generation() -> None:
    d = decisions.decide_adapter_action(SPEC, AdapterStatus(failed_generation=1), Observed(None, 1))
    patch = decisions.adapter_status_patch(SPEC, AdapterStatus(), d, None, NOW)
    assert patch["phase"] == "Failed" and patch["failedGeneration"] == 1
    assert patch["readyReplicas"] == 0 and patch["conditions"][0]["status"] == "False"


def test_retry_delay_grows_and_is_capped() -> None:
    delays = [decisions.retry_delay(i, cap=10) for i in range(8)]
    assert delays == sorted(delays) and delays[0] == 0.5 and delays[-1] == 10


# --- properties -------------------------------------------------------------------------------

names = st.sampled_from(["r0", "r1", "r2", "r3", "r4"])
specs = st.builds(
    AdapterSpec, tenant=st.just("alice"), name=st.just("sql"),
    base_model=st.sampled_from(["base", "other"]),
    uri=st.sampled_from(["/a/sql", "hf://org/sql", "s3://b/sql"]),
    revision=st.sampled_from([None, "v1", "v2"]),
    mode=st.sampled_from(list(PlacementMode)), replicas=st.integers(1, 6),
    generation=st.integers(1, 3))
statuses = st.builds(
    AdapterStatus, phase=st.sampled_from([None, *Phase]),
    observed_generation=st.sampled_from([None, 1, 2, 3]),
    failed_generation=st.sampled_from([None, 1, 2, 3]),
    registered_source=st.sampled_from([None, "/a/sql", "hf://org/sql@v1", "s3://b/sql#v2"]))
serving_views = st.one_of(st.none(), st.builds(
    ServingAdapter, adapter_id=st.just("alice/sql@x"),
    source=st.sampled_from(["/a/sql", "hf://org/sql@v1", "s3://b/sql"]),
    base_model=st.sampled_from(["base", "other"]), digest=st.just("x" * 64),
    replicas=st.lists(names, unique=True).map(lambda r: tuple(sorted(r)))))


@settings(max_examples=400, deadline=None)
@given(spec=specs, status=statuses, adapter=serving_views, count=st.integers(0, 5))
def test_never_ready_without_serving_confirmation(spec: AdapterSpec, status: AdapterStatus,
                                                  adapter: ServingAdapter | None,
                                                  count: int) -> None:
    observed = Observed(adapter, count)
    d = decisions.decide_adapter_action(spec, status, observed)
    if d.phase is Phase.READY:
        assert adapter is not None and adapter.base_model == spec.base_model
        patch = decisions.adapter_status_patch(spec, status, d, observed, NOW)
        assert patch["readyReplicas"] == len(adapter.replicas) >= patch["wantedReplicas"]
        confirmed_before = (status.phase is Phase.READY
                            and status.observed_generation == spec.generation)
        if not (spec.mode is PlacementMode.DEMAND and confirmed_before):
            # Ready for the first time only when serving holds it where placement wants it.
            assert 1 <= decisions.wanted_replicas(spec, count) <= len(adapter.replicas)
    else:
        patch = decisions.adapter_status_patch(spec, status, d, observed, NOW)
        assert patch["conditions"][-1]["status"] == "False"


@settings(max_examples=300, deadline=None)
@given(spec=specs, status=statuses, adapter=serving_views, count=st.integers(0, 5))
def test_decisions_are_deterministic_and_converged_state_needs_no_action(
        spec: AdapterSpec, status: AdapterStatus, adapter: ServingAdapter | None,
        count: int) -> None:
    observed = Observed(adapter, count)
    first = decisions.decide_adapter_action(spec, status, observed)
    assert decisions.decide_adapter_action(spec, status, observed) == first
    if first.action is Action.READY:
        # Writing the status it produces and looking again changes nothing (idempotence).
        again = replace(status, phase=Phase.READY, observed_generation=spec.generation)
        assert decisions.decide_adapter_action(spec, again, observed).action is Action.READY


key_maps = st.dictionaries(st.sampled_from(["k1", "k2", "k3", "k4"]),
                           st.sampled_from(["h1", "h2", "h3"]), max_size=4)


@given(desired=key_maps, registered=key_maps)
def test_applying_a_key_plan_reaches_the_desired_keys_and_then_is_empty(
        desired: dict[str, str], registered: dict[str, str]) -> None:
    plan = decisions.decide_key_changes(desired, registered)
    after = {k: h for k, h in registered.items() if k not in plan.revoke}
    after.update(plan.add)
    assert after == desired
    assert decisions.decide_key_changes(desired, after).empty


def test_demand_adapter_is_proven_once_then_may_be_evicted() -> None:
    spec = replace(SPEC, mode=PlacementMode.DEMAND)
    first = decisions.decide_adapter_action(spec, AdapterStatus(), Observed(served(spec), 2))
    assert (first.action, first.wanted) == (Action.LOAD, 1)
    ready = AdapterStatus(phase=Phase.READY, observed_generation=spec.generation)
    evicted = decisions.decide_adapter_action(spec, ready, Observed(served(spec), 2))
    assert evicted.action is Action.READY


@pytest.mark.parametrize(("tenant", "namespace", "bindings", "allowed"), [
    ("team-a", "team-a", {}, True),  # unlisted namespace: the tenant of its own name
    ("team-b", "team-a", {}, False),
    ("acme", "team-a", {"team-a": ["acme", "acme-dev"]}, True),
    ("team-a", "team-a", {"team-a": ["acme"]}, False),  # a listed namespace: exactly its list
    ("anyone", "platform", {"platform": ["*"]}, True),
    ("acme", "team-b", {"team-a": ["acme"]}, False),
    ("acme", None, {"team-a": ["*"]}, False),
])
def test_tenant_binding(tenant: str, namespace: str | None, bindings: dict[str, list[str]],
                        allowed: bool) -> None:
    refusal = decisions.decide_tenant_binding(tenant, namespace, bindings)
    assert (refusal is None) is allowed
    if refusal is not None:
        assert repr(tenant) in refusal or namespace is None

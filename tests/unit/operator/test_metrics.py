"""The operator's phase gauge: what the "adapters stuck not Ready" alert reads."""

from __future__ import annotations

from prometheus_client import generate_latest

from lorafleet.operator.metrics import AdapterPhases, _PhaseCollector


def test_phase_counts_follow_events_and_deletions():
    phases = AdapterPhases()
    phases.observe("ns", "a", "Loading", deleted=False)
    phases.observe("ns", "b", None, deleted=False)
    phases.observe("ns", "a", "Ready", deleted=False)
    phases.observe("other", "a", "Failed", deleted=False)
    assert phases.counts()["Ready"] == 1 and phases.counts()["Pending"] == 1
    assert phases.counts()["Failed"] == 1 and phases.counts()["Loading"] == 0
    phases.observe("other", "a", "Failed", deleted=True)
    assert phases.counts()["Failed"] == 0


def test_exposition_has_every_phase():
    from prometheus_client import CollectorRegistry

    phases = AdapterPhases()
    phases.observe("ns", "a", "Ready", deleted=False)
    registry = CollectorRegistry()
    registry.register(_PhaseCollector(phases))
    text = generate_latest(registry).decode()
    assert 'lorafleet_operator_adapters{phase="Ready"} 1.0' in text
    assert 'lorafleet_operator_adapters{phase="Failed"} 0.0' in text

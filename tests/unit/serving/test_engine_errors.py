"""A replica's failure reaches the client as one short line, never Ray's remote traceback."""

from __future__ import annotations

import traceback

from ray.exceptions import RayTaskError

from lorafleet.adapters.errors import AdapterFetchError
from lorafleet.serving.engine.errors import AdapterLoadError, public_message


def test_a_ray_wrapped_load_error_becomes_its_own_short_reason() -> None:
    cause = AdapterLoadError("adapter alice/sql@0123456789ab could not be fetched: store: gone")
    try:
        raise cause
    except AdapterLoadError:
        remote = traceback.format_exc()
    wrapped = RayTaskError("ServeReplica:lorafleet:EngineReplica.generate", remote, cause,
                           proctitle="ray::ServeReplica", pid=4242, ip="10.0.0.7",
                           actor_id="f" * 32).as_instanceof_cause()
    assert isinstance(wrapped, AdapterLoadError)  # what the API layer catches
    assert "File " in str(wrapped) and "10.0.0.7" in str(wrapped)  # what leaked before
    message = public_message(wrapped)
    assert message == "adapter alice/sql@0123456789ab could not be fetched: store: gone"


def test_reasons_are_single_lines_and_bounded() -> None:
    assert public_message(AdapterFetchError("a\nb", transient=True)) == "a"
    assert len(public_message(AdapterLoadError("x" * 5000))) == 300
    assert public_message(AdapterLoadError("")) == "AdapterLoadError"

"""Request views for tests of the pure scheduling policies (``serving.scheduling``).

``W``, ``R`` and ``P`` are the three request states; :func:`view` builds a
:class:`RequestView` with small defaults, so a test names only what its case is about.
"""

from __future__ import annotations

from lorafleet.serving.scheduling import RequestState, RequestView

W, R, P = RequestState.WAITING, RequestState.RUNNING, RequestState.PAUSED


def view(rid: str, state: RequestState = W, adapter: str | None = None,
         tenant: str | None = None, **kw: object) -> RequestView:
    """A request that arrived at 0 with 20 prompt tokens and 100 to generate, unless ``kw``
    says otherwise; an adapter ``t/name`` belongs to tenant ``t`` unless ``tenant`` is given."""
    fields: dict[str, object] = {"arrival": 0.0, "prompt_tokens": 20, "max_tokens": 100, **kw}
    adapter = fields.pop("adapter_id", adapter)  # type: ignore[assignment]
    if adapter is not None and tenant is None:
        tenant = adapter.split("/")[0]
    return RequestView(request_id=rid, state=state, adapter_id=adapter, tenant=tenant,
                       **fields)  # type: ignore[arg-type]

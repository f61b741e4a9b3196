"""The HTTP layer: OpenAI-compatible routes, the admin API, errors, tenancy and quotas.

``build_app(services)`` in ``app`` is the entry point; everything it needs is injected
through ``services.ApiServices``, so tests can drive it in-process over a real engine.
"""

"""LoRAFleet's data plane: the OpenAI-compatible API, the vLLM engine and its scheduler, Ray Serve.

Subpackages:
- ``api``: HTTP: request bodies, generation, responses, tools, errors, tenancy, quotas,
  metering, the OpenAI and admin routes (``app.build_app`` is the entry point).
- ``engine``: the engine protocol, the vLLM engine, engine clients, adapter residency, and the
  vLLM plugin with our CPU LoRA ops (``lora_cpu``).
- ``scheduling``: streaming-aware scheduling: a pure policy and the thin vLLM scheduler
  subclass that applies its plans.
- ``kvcache``: KV-cache tiers for paused requests and the vLLM KV connector that fills them.
- ``demo``: the demo model, the tiny test model, the demo adapters' datasets and training.

Modules: ``config`` (settings), ``assemble`` (building the API's services), ``deploy`` (Ray
Serve wiring), ``placement`` (where replicas run, which devices they ask for),
``admin_listener`` (the admin API on a port of its own), ``metrics``, ``seed`` (demo tenants),
``cli`` (the ``lorafleet`` command).
"""

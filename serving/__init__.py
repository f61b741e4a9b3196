"""LoRAFleet's data plane: the OpenAI-compatible API, the vLLM engine, Ray Serve wiring.

Subpackages: ``api`` (HTTP: schemas, errors, tenancy, quotas, routes), ``engine`` (the engine
protocol, the vLLM engine, the CPU LoRA ops plugin), ``demo`` (demo model and adapters).
Modules: ``config`` (settings), ``deploy`` (Ray Serve), ``metrics``, ``assemble`` (building
the API's services), ``seed`` (demo tenants), ``cli`` (the ``lorafleet`` command).
"""

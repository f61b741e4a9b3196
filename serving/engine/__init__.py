"""Engines: the small async ``Engine`` protocol, its vLLM implementation, routing clients.

``protocol`` (dataclasses and the protocol), ``vllm_engine`` (``VLLMEngine``), ``client``
(``EngineClient`` and the in-process ``LocalEngineClient``), ``residency`` (which adapters a
replica keeps), ``errors``, ``lora_cpu`` (the vLLM plugin fixing and speeding up CPU LoRA ops).
"""

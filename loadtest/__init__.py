"""LoRAFleet's load-test runner and benchmark harness.

Modules: ``workload`` (the workload file and its seeded plan), ``client`` (streaming OpenAI
client recording token arrivals), ``metrics`` (pure QoE and latency figures), ``runner``
(bounded async runs), ``report`` (JSON, table, plots, HTML), ``compare`` (ratios), ``bench``
(scenarios against stock vLLM and LoRAFleet started on loopback), ``cli``.
"""

"""Every engine process agrees on the CPU's vector ISA (``vllm_engine.pin_inductor_vec_isa``).

The failure it prevents: torch's inductor decides per process whether the ISA works by
compiling and loading a probe; a process whose probe fails (a loaded machine) builds kernels
without the ISA while the machine's shared kernel cache holds code generated with it, and
the C++ build fails. vLLM's sampler compiles such a kernel for logprobs: stock vLLM's engine
died on a logprobs request in the wire-format test. Here the probe is made to fail, in a
fresh interpreter (the decision is cached per process).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from lorafleet.loadtest.bench.servers import VLLMOptions, vllm_command

PROBE = textwrap.dedent("""
    import os, sys
    os.environ.pop("TORCHINDUCTOR_VEC_ISA_OK", None)
    from torch._inductor import cpu_vec_isa
    cpu_vec_isa.VecISA.check_build = lambda self, code: False  # the probe fails
    if sys.argv[1] == "pinned":
        from lorafleet.serving.engine.vllm_engine import pin_inductor_vec_isa
        pin_inductor_vec_isa()
    print(os.environ.get("TORCHINDUCTOR_VEC_ISA_OK"), bool(cpu_vec_isa.pick_vec_isa()))
""")


def probe(mode: str) -> str:
    return subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          check=True, timeout=120).stdout.strip()


def test_a_failing_probe_no_longer_takes_the_isa_away() -> None:
    cpu_has_one = bool(subprocess.run(
        [sys.executable, "-c", "from torch._inductor.cpu_vec_isa import valid_vec_isa_list as v;"
         "import torch._inductor.config as c; c.cpp.vec_isa_ok = True; print(bool(v()))"],
        capture_output=True, text=True, check=True, timeout=120).stdout.strip() == "True")
    assert probe("stock") == "None False"  # what an engine decided on its own
    assert probe("pinned") == f"1 {cpu_has_one}"  # the CPU's flags decide, probe or not


def test_stock_vllm_in_benchmarks_and_tests_gets_the_same_setting() -> None:
    opts = VLLMOptions(model_dir=Path("/m"), served_model_name="m", max_loras=1, max_lora_rank=8,
                       max_cpu_loras=1, adapters={})
    _, env = vllm_command(opts, 8000)
    assert env["TORCHINDUCTOR_VEC_ISA_OK"] == "1"

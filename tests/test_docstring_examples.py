"""The Examples in the core modules' docstrings run and print what they show.

lrc_kernels.trace, analyze, plan and plan_bytes run theirs in test_trace.py, test_analyze.py and test_plan.py.
The Triton modules other than triton.next_use (pure torch) are left out: their examples need a kernel launch.
"""

import doctest
import importlib

import pytest
import torch

MODULES = ["srp", "cache", "bootstrap", "routing", "dispatch", "cpu.parallel", "cpu.srp", "io", "io._common",
           "triton.next_use", "hf", "hf.routers", "hf.recorder"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    if name.startswith("hf"):
        pytest.importorskip("transformers")  # the hf examples load the bundled tiny MoE model
    module = importlib.import_module(f"lrc_kernels.{name}")
    result = doctest.testmod(module, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0

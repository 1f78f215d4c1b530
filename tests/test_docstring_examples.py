"""Every Example in the library's docstrings runs and prints what it shows: the one place that runs them.

MODULES lists every module whose docstrings hold examples; test_every_public_name_shows_an_example checks that
each public function and class (the ``__all__`` of the public packages) has one and that its module is listed.
"""

import doctest
import importlib
import inspect
import os

import pytest
import torch

MODULES = ["srp", "cache", "bootstrap", "routing", "dispatch", "trace", "analyze", "plan", "plan_bytes", "_meta",
           "cpu.parallel", "cpu.srp", "io", "io._common", "triton.next_use", "triton.cache", "hf", "hf.routers",
           "hf.recorder", "hf.callbacks", "monitor"]
PUBLIC_PACKAGES = ["lrc_kernels", "lrc_kernels.analyze", "lrc_kernels.io", "lrc_kernels.hf"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    if name.startswith("hf"):
        pytest.importorskip("transformers")  # the hf examples load the bundled tiny MoE model
    if name == "triton.cache":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("its example launches the kernel on CPU tensors, which needs TRITON_INTERPRET=1")
    module = importlib.import_module(f"lrc_kernels.{name}")
    result = doctest.testmod(module, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


def _public_functions_and_classes():
    for package in PUBLIC_PACKAGES:
        module = importlib.import_module(package)
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.isfunction(value) or inspect.isclass(value):
                yield name, value


def test_every_public_name_shows_an_example():
    pytest.importorskip("transformers")  # lrc_kernels.hf's names load on first use and need it
    listed = {f"lrc_kernels.{name}" for name in MODULES}
    missing, unlisted = set(), set()
    for name, value in _public_functions_and_classes():
        examples = doctest.DocTestParser().get_examples(value.__doc__ or "")
        if not [example for example in examples if not example.options.get(doctest.SKIP)]:
            missing.add(name)
        elif value.__module__ not in listed:
            unlisted.add(f"{value.__module__}.{name}")
    assert not missing
    assert not unlisted

"""Memory that must not outlive a forward pass.

A backend package that keeps the exception of a failed import step (xformers does when its
compiled ops don't match torch) used to pin the frames under the lazy import, i.e. the first
forward's activations (2.9 GiB at 14B, 832x480x81, measured on an H100). The dispatcher now
imports backends in a worker thread; this checks that a caller's locals are freed.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import sys
import weakref

import pytest
import torch

from steadydancer import attention as A

_FAKE = """
import torch
try:
    raise OSError("compiled ops built for another torch")
except OSError as exc:
    STORED = exc  # kept, with its traceback, like xformers' _cpp_lib does

def run(q, k, v):
    raise NotImplementedError("No operator found")
"""


@pytest.fixture
def leaky_backend(tmp_path, monkeypatch):
    (tmp_path / "leaky_attention_pkg.py").write_text(_FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("leaky_attention_pkg", None)

    def load():
        return importlib.import_module("leaky_attention_pkg").run

    spec = dataclasses.replace(A.SPECS["xformers"], load=load, devices=frozenset({"cpu", "cuda"}))
    monkeypatch.setitem(A.SPECS, "xformers", spec)
    A._loaded.cache_clear()
    yield
    A._loaded.cache_clear()
    sys.modules.pop("leaky_attention_pkg", None)


def test_failed_lazy_import_does_not_pin_the_callers_activations(leaky_backend):
    dispatcher = A.AttentionDispatcher("auto")

    def forward() -> weakref.ref:
        activations = torch.zeros(1024, 1024)  # stands for the forward's token tensors
        q = torch.randn(1, 8, 2, 16)
        out = dispatcher(q, q, q)  # first call: imports the backends lazily, xformers fails
        assert out.shape == q.shape
        return weakref.ref(activations)

    ref = forward()
    gc.collect()
    assert dispatcher.backend_used != "xformers" and "xformers" in dispatcher.dropped
    assert ref() is None, "a backend's stored import traceback keeps the forward's locals alive"

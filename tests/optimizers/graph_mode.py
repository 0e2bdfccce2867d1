"""The optimizers' cuda_graphs=True path on the CPU: device scalars, captured closures and capture keys, run eagerly."""

from __future__ import annotations

from types import ModuleType

import pytest


class EagerStandIn:
    """StepGraph's stand-in: runs the captured closure at every call (as a replay would) and counts captures."""

    built = 0

    def __init__(self, fn, device, enabled=True):
        type(self).built += 1
        self.fn = fn

    def __call__(self):
        return self.fn()


def eager_graph_mode(monkeypatch: pytest.MonkeyPatch, module: ModuleType) -> type[EagerStandIn]:
    """Make ``module`` take its graph path on any device, with :class:`EagerStandIn` as its StepGraph."""
    monkeypatch.setattr(module, "can_capture", lambda device: True)
    monkeypatch.setattr(module, "StepGraph", EagerStandIn)
    EagerStandIn.built = 0
    return EagerStandIn

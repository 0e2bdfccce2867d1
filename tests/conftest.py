"""Fixtures every test shares."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each test's training starts from a fresh accelerate state, as a new process does: accelerate keeps one
    mixed precision per process and refuses a second (a bf16 run followed by an fp32 one in the same worker)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)

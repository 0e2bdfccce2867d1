"""docs/optimizers.md carries the registry's table; it must be regenerated whenever the registry changes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location(
        "gen_optimizer_docs", ROOT / "tools" / "gen_optimizer_docs.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_optimizer_docs_are_up_to_date() -> None:
    gen = _generator()
    current = gen.DOC.read_text(encoding="utf-8")
    assert gen.BEGIN in current and gen.END in current
    assert gen.updated(current) == current, (
        "docs/optimizers.md is stale: run python tools/gen_optimizer_docs.py"
    )


def test_generated_table_lists_every_name_and_alias() -> None:
    from library.optimizers.registry import list_optimizers

    block = _generator().render()
    for spec in list_optimizers():
        assert f"| `{spec.name}` |" in block
        assert all(f"`{alias}`" in block for alias in spec.aliases)
    assert "| `SGG_T_TOTAL` | `t_total` | LambSGG_v2 |" in block

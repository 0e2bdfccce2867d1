"""Regenerate the optimizer table in docs/optimizers.md from the registry.

Only the part between the BEGIN/END markers is rewritten; the hand-written text around it is kept. The table
is built from the registry's static data (no imports of optimizer packages, no probing of this machine), so
the file is the same on every machine and tests/test_optimizer_docs.py can tell when it is stale.

    python tools/gen_optimizer_docs.py          # rewrite docs/optimizers.md
    python tools/gen_optimizer_docs.py --check  # exit 1 if it is stale
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from library.errors import OptimizerUnavailable  # noqa: E402
from library.optimizers.registry import OptimizerSpec, list_optimizers, optimizer_family, package_of  # noqa: E402
from tools.docgen import write_or_check  # noqa: E402

DOC = ROOT / "docs" / "optimizers.md"
BEGIN = "<!-- BEGIN GENERATED: tools/gen_optimizer_docs.py -->"
END = "<!-- END GENERATED -->"
DEVICE_PACKAGES = {"torch_xla": "XLA/TPU device + torch_xla", "torch_npu": "Ascend NPU + torch_npu"}


def _availability(spec: OptimizerSpec) -> str:
    if spec.refused:
        return "refused: needs its own training loop"
    device = [DEVICE_PACKAGES[m] for m in spec.requires if m in DEVICE_PACKAGES]
    if device:
        return device[0]
    extra = [m for m in spec.requires if m in ("apex", "torchdistx")]
    if spec.needs_cuda:
        return "CUDA GPU" + "".join(f" + {m}" for m in extra)
    return "CPU, CUDA" + "".join(f" (needs {m})" for m in extra)


def _defaults(spec: OptimizerSpec) -> str:
    parts = [f"{k}={v!r}" for k, v in spec.defaults.items()]
    parts += [f"{k}={v!r} (fixed)" for k, v in spec.build.fixed.items()]
    parts += [f"{k}={v!r}" for k, v in spec.build.group_kwargs.items()]
    return ", ".join(parts) or "class defaults"


def _env(spec: OptimizerSpec) -> dict[str, str]:
    """Variables the optimizer reads: those whose setting its constructor takes (in-house classes only)."""
    if spec.build.module.startswith("library."):
        try:
            accepted = spec.build.accepted_kwargs(spec.name)
        except OptimizerUnavailable:
            return dict(spec.env)
        return {k: v for k, v in spec.env.items() if k in accepted}
    return dict(spec.env)


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or " "


def render() -> str:
    """The generated block, markers included."""
    lines = [
        BEGIN,
        "",
        "| name | aliases | package | family | defaults | state bytes / param | runs on |",
        "|---|---|---|---|---|---|---|",
    ]
    for spec in list_optimizers():
        cells = [
            f"`{spec.name}`",
            ", ".join(f"`{a}`" for a in spec.aliases),
            package_of(spec),
            optimizer_family(spec),
            _defaults(spec),
            spec.state_bytes or "-",
            _availability(spec),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += [
        "",
        "Environment variables (read only by the optimizers whose constructor takes the setting):",
        "",
    ]
    lines += ["| variable | setting | optimizers |", "|---|---|---|"]
    by_var: dict[tuple[str, str], list[str]] = {}
    for spec in list_optimizers():
        for key, var in _env(spec).items():
            by_var.setdefault((var, key), []).append(spec.name)
    for (var, key), names in sorted(by_var.items()):
        lines.append(f"| `{var}` | `{key}` | {', '.join(names)} |")
    lines += ["", "Refused names and why:", ""]
    lines += [f"- `{s.name}`: {s.refused}." for s in list_optimizers() if s.refused]
    lines += ["", END]
    return "\n".join(lines) + "\n"


def updated(text: str) -> str:
    """``text`` with its generated block replaced (appended when there is none)."""
    head, sep, rest = text.partition(BEGIN)
    if not sep:
        return text.rstrip("\n") + "\n\n" + render()
    _, sep, tail = rest.partition(END)
    if not sep:
        raise SystemExit(f"{DOC}: {BEGIN} without {END}")
    return head + render().rstrip("\n") + tail


def main(argv: list[str] | None = None) -> int:
    return write_or_check(DOC, updated, "python tools/gen_optimizer_docs.py", __doc__.splitlines()[0], argv,
                          empty="# Optimizers\n")


if __name__ == "__main__":
    sys.exit(main())

"""Count the ATen ops one optimizer step dispatches on the SD1.5 LoRA parameter set (CPU is enough).

On a GPU a LoRA optimizer step is bound by kernel launches, not arithmetic (384 small tensors), so the number of
ops per step is the figure to drive down before timing on the GPU with bench/optimizer_step.py.
    python bench/count_ops.py CustomAdamW Automagic_Sinkgd AdamWSGG
    python bench/count_ops.py CustomAdamW CustomAdamW:use_spd=False:use_tam=False   # NAME:key=value settings
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.optimizer_step import make_params  # noqa: E402
from library.optimizers.registry import build_optimizer  # noqa: E402

# Metadata-only ops launch no kernel on a GPU.
_FREE = {"view", "_unsafe_view", "as_strided", "detach", "t", "expand", "alias", "unsqueeze", "squeeze", "select",
         "slice", "permute", "transpose", "_reshape_alias", "unbind", "split", "split_with_sizes", "lift_fresh",
         "_record_function_enter_new", "_record_function_exit", "empty", "empty_like", "is_same_size"}


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        if name not in _FREE:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count_step_ops(optimizer: torch.optim.Optimizer, params, steps: int = 3) -> collections.Counter:
    """Ops of the last of `steps` steps (the first steps may initialise state)."""
    gen = torch.Generator().manual_seed(0)
    counter = None
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        counter = _Counter()
        with counter:
            optimizer.step()
    return counter.ops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "optimizers", nargs="*", default=["CustomAdamW", "Automagic_Sinkgd", "AdamWSGG"],
        help="registry names, each optionally followed by :key=value settings (as --optimizer_args takes them)",
    )
    parser.add_argument("--top", type=int, default=8, help="show the N most frequent ops")
    args = parser.parse_args(argv)
    params, names = make_params(16, "cpu")
    base = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    ref = sum(count_step_ops(base, params).values())
    print(f"{len(params)} tensors; torch AdamW(foreach): {ref} ops/step")
    for spec in args.optimizers:
        name, *settings = spec.split(":")
        ps, ns = make_params(16, "cpu")
        opt, _ = build_optimizer(name, [{"params": ps, "names": ns}], lr=1e-4, optimizer_args=settings)
        ops = count_step_ops(opt, ps)
        total = sum(ops.values())
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(args.top))
        print(f"{spec}: {total} ops/step ({total / ref:.1f}x AdamW foreach); {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

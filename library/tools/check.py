"""check_lora_weights.py: one CSV-like line per LoRA tensor (shape, mean |w|, min |w|), to spot dead
modules."""

from __future__ import annotations

import argparse

import torch

from networks.files import read_lora_file

LORA_KEY_MARKERS = ("lora_up", "lora_down", "lora_A", "lora_B", "oft_")


def check_file(args: argparse.Namespace) -> None:
    state = read_lora_file(args.file)
    values = [(k, v) for k, v in state.items() if any(m in k for m in LORA_KEY_MARKERS)]
    print(f"number of LoRA modules: {len(values)}")
    if args.show_all_keys:
        values += [(k, v) for k, v in state.items() if not any(m in k for m in LORA_KEY_MARKERS)]
        print(f"number of all modules: {len(values)}")
    for key, value in values:
        value = value.to(torch.float32).abs()
        shape = str(tuple(value.shape)).replace(", ", "-")
        print(f"{key},{shape},{value.mean()},{value.min()}")

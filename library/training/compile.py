"""torch.compile of the U-Net, spelled as sd-scripts users know it: --torch_compile, --dynamo_mode, --dynamo_backend.

Why it matters: an SD1.5 LoRA step at batch 4 is bound by kernel launches (about 3,400 per step), not by the GPU.
torch.compile fuses the elementwise work; ``--dynamo_mode reduce-overhead`` also records forward and backward as CUDA
graphs, replayed with one launch each, which is what makes the step GPU-bound (docs/performance.md has the figures).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

import torch

from library.errors import ConfigError

logger = logging.getLogger(__name__)
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_requested(args: argparse.Namespace) -> bool:
    return bool(args.torch_compile or args.dynamo_mode)


def dynamo_records_cuda_graphs(args: argparse.Namespace) -> bool:
    """Whether torch.compile's --dynamo_mode records CUDA graphs itself (reduce-overhead modes); not to be confused
    with --cuda_graphs, where the trainer records the step."""
    return compile_requested(args) and args.dynamo_mode in _CUDA_GRAPH_MODES


def check_compile_device(args: argparse.Namespace, device: torch.device) -> None:
    """CUDA-graph modes and --cuda_graphs need a CUDA device: say so before any model is loaded."""
    if dynamo_records_cuda_graphs(args) and device.type != "cuda":
        raise ConfigError(f"--dynamo_mode {args.dynamo_mode} records CUDA graphs and needs a CUDA device (this run is "
                          f"on {device.type}); valid here: --dynamo_mode default or max-autotune-no-cudagraphs")
    if args.cuda_graphs and device.type != "cuda":
        raise ConfigError(f"--cuda_graphs records CUDA graphs and needs a CUDA device (this run is on "
                          f"{device.type}); drop --cuda_graphs")


def compile_unet(unet: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    mode = None if args.dynamo_mode in (None, "default") else args.dynamo_mode
    logger.info("torch.compile(unet, mode=%s, backend=%s): the first step compiles (minutes on SD-size models)",
                mode or "default", args.dynamo_backend)
    return torch.compile(unet, mode=mode, backend=args.dynamo_backend)


def step_marker(args: argparse.Namespace) -> Callable[[], None]:
    """Called before each U-Net forward: CUDA-graph trees must know where an iteration starts."""
    if dynamo_records_cuda_graphs(args):
        return torch.compiler.cudagraph_mark_step_begin
    return lambda: None

"""Several processes and data-loader workers: gradient averaging with sd-scripts' DDP options, persistent workers,
and the DeepSpeed options checked before any model loads.

The LoRA network is not wrapped in DDP (its forward is never called: the U-Net's patched layers are), so the DDP
options act on the one flat all-reduce that averages the LoRA gradients, meaning there what they mean in DDP.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from collections.abc import Iterator, Sequence

import torch

from library.errors import ConfigError

logger = logging.getLogger("loraforge")

_DEEPSPEED_OPTIONS = ("zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device",
                      "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model",
                      "fp16_master_weights_and_gradients")


class GradientAverager:
    """Average gradients across processes in ONE flat all-reduce.

    gradient_as_bucket_view (--ddp_gradient_as_bucket_view): the flat buffer persists and each parameter's
    gradient becomes a view into it, instead of a fresh tensor copied out of a temporary buffer (one copy of
    the gradients less at the peak). static_graph (--ddp_static_graph): the same parameters get gradients every
    step, so which ones and where they sit in the buffer is worked out once, on the first step.
    """

    def __init__(self, params: Sequence[torch.Tensor], world: int, *, gradient_as_bucket_view: bool = False,
                 static_graph: bool = False) -> None:
        self.params = list(params)
        self.world = world
        self.bucket_view = gradient_as_bucket_view
        self.static_graph = static_graph
        self.layout: list[torch.Tensor] | None = None  # the parameters in the buffer (static graph)
        self.buffer: torch.Tensor | None = None
        self.layouts_built = 0

    def _with_grads(self) -> list[torch.Tensor]:
        if self.static_graph and self.layout is not None:
            return self.layout
        self.layouts_built += 1
        chosen = [p for p in self.params if p.grad is not None] if self.static_graph else self.params
        if self.static_graph:
            self.layout = chosen
        return chosen

    def __call__(self) -> None:
        params = self._with_grads()
        dtypes = {p.dtype for p in params}
        view = self.bucket_view and len(dtypes) == 1
        numel = sum(p.numel() for p in params)
        if view:
            if self.buffer is None or self.buffer.numel() != numel:
                self.buffer = torch.zeros(numel, dtype=params[0].dtype, device=params[0].device)
            flat = self.buffer
            offset = 0
            for p in params:
                n = p.numel()
                part = flat[offset:offset + n]
                if p.grad is None:
                    part.zero_()
                elif p.grad.data_ptr() != part.data_ptr():
                    part.copy_(p.grad.reshape(-1))
                offset += n
        else:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                              for p in params])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p in params:
            n = p.numel()
            part = flat[offset:offset + n].view_as(p)
            p.grad = part if view else part.to(p.dtype)
            offset += n


class EpochBatches:
    """A batch sampler whose batches are swapped each epoch, each index tagged with the epoch (and, with token
    warm-up, the optimizer step it trains at): one DataLoader, and so one set of --persistent_data_loader_workers,
    serves every epoch while each worker's dataset copy follows what the item depends on."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batches: list[list[int]] = []
        self.steps: dict[int, int] | None = None

    def set(self, epoch: int, batches: list[list[int]], steps: dict[int, int] | None = None) -> None:
        self.epoch, self.batches, self.steps = epoch, batches, steps

    def __iter__(self) -> Iterator[list[tuple[int, int, int | None]]]:
        for batch in self.batches:
            yield [(self.epoch, i, None if self.steps is None else self.steps.get(i, 0)) for i in batch]

    def __len__(self) -> int:
        return len(self.batches)


class EpochIndexed(torch.utils.data.Dataset):
    """dataset[(epoch, i, step)] = the dataset's item i in that epoch (set in the worker that loads it), at that
    optimizer step when the captions depend on it."""

    def __init__(self, dataset, max_train_steps: int) -> None:
        self.dataset = dataset
        self.max_train_steps = max_train_steps

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int | None]):
        epoch, index, step = key
        if self.dataset.epoch != epoch:
            self.dataset.set_epoch(epoch)
        if step is not None:
            self.dataset.set_sample_steps({index: step}, self.max_train_steps)
        return self.dataset[index]


def check_persistent_workers(args: argparse.Namespace) -> bool:
    """Whether the workers are kept; a switch with no worker to keep is said, not ignored."""
    if args.persistent_data_loader_workers and args.max_data_loader_n_workers == 0:
        logger.warning("--persistent_data_loader_workers: there are no workers to keep with "
                       "--max_data_loader_n_workers 0 (images load in the training process)")
        return False
    return bool(args.persistent_data_loader_workers)


def check_deepspeed(args: argparse.Namespace) -> None:
    """DeepSpeed options: one line before any model loads where they cannot work here."""
    given = [f"--{o}" for o in _DEEPSPEED_OPTIONS if getattr(args, o) is not None and getattr(args, o) is not False]
    if not args.deepspeed:
        if given:
            logger.warning("%s: DeepSpeed options, without effect unless --deepspeed is given (as in sd-scripts)",
                           ", ".join(given))
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("--deepspeed needs the deepspeed package (DS_BUILD_OPS=0 pip install deepspeed) and a "
                          "CUDA GPU; without it, drop --deepspeed: several GPUs train with accelerate launch alone")
    if not torch.cuda.is_available():
        raise ConfigError("--deepspeed needs a CUDA GPU; on this machine drop --deepspeed")
    raise ConfigError("--deepspeed: training the LoRA through DeepSpeed's engine is not supported yet (the "
                      "network is trained outside a wrapped module); several GPUs train with accelerate launch alone")

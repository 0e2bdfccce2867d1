"""The LoRA training recipe: setup() builds every component from the options, train() is the loop.

Read top to bottom: validation (no model loaded yet), data, model, network, optimizer, scheduler, then the step —
forward, loss, backward, clip, optimizer step — and the saves. Loss values are read back from the device only
every `--log_every_n_steps` steps, so a GPU step never waits on the host.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from library.data.dataset import collate
from library.data.latent_cache_key import vae_fingerprint
from library.errors import ConfigError, LoraForgeError, one_line
from library.optimizers.loop import LoopNeeds
from library.training import checkpoints, conditioning, losses, metadata, resume, state_io
from library.training.atomic import atomic_dir, atomic_file, check_output_names, check_writable
from library.training.compile import check_compile_device, compile_requested, compile_unet, step_marker
from library.training.earlier_run import set_aside
from library.training.graphed_step import GraphedStep, checkpoint_without_rng_state
from library.training.hub import HubUploader, download_state
from library.training.lr_schedulers import build_lr_scheduler
from library.training.multiprocess import (
    EpochBatches,
    EpochIndexed,
    GradientAverager,
    check_persistent_workers,
)
from library.training.output_lock import OutputLock
from library.training.progress import Progress
from library.training.sample_prompts import check_steps, load_prompts
from library.training.setup import (
    build_dataset,
    build_network,
    build_optimizer_for,
    check_optimizer_settings,
    load_model,
    merge_base_weights,
    optimizer_name,
    store_base_in_fp8,
    warn_long_captions,
    weight_dtype_for,
)
from library.training.trackers import log_scalars, logging_dir_of_run, lr_logs, start_trackers, tracker_choice
from library.training.validate import (
    check_free_space_for_network,
    import_network_module,
    output_files_exist,
    validate_args,
)
from library.training.validation_loss import ValidationLoss

logger = logging.getLogger("loraforge")


class TrainingStopped(LoraForgeError):
    """Training stopped early (interrupted or diverged) after saving what could be saved."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TrainProgress:
    """Where the run is; saved with the state so --resume continues exactly."""

    global_step: int = 0
    epoch: int = 0
    batches_done_in_epoch: int = 0

    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "epoch": self.epoch, "batches_done_in_epoch": self.batches_done_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.global_step, self.epoch = int(state["global_step"]), int(state["epoch"])
        self.batches_done_in_epoch = int(state["batches_done_in_epoch"])


class LoRATrainer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.output_dir = Path(args.output_dir) if args.output_dir else None
        self.progress = TrainProgress()
        self.stop_signal: str | None = None
        self.started_at = time.time()
        self.session_id = random.SystemRandom().randint(0, 2**31 - 1)
        self.saving = False  # a signal during a save lets it finish

    # ------------------------------------------------------------------ setup
    def check(self) -> None:
        """Everything that needs no model: the options, the state to resume, the prompts, the dataset (every image
        decoded once) and the output files. Run first, so a mistake never costs a model load; --dry_run stops
        after it."""
        a = self.args
        validate_args(a)
        local_state = a.resume and not a.resume_from_huggingface  # a Hub state is found once downloaded
        self.resume_found = resume.find_state(a.resume) if local_state else None
        self.prompts = load_prompts(a.sample_prompts) if a.sample_prompts else None  # a bad line stops now
        if self.prompts:
            check_steps(self.prompts, a.sample_sampler)
        if not a.overwrite and not a.resume:
            existing = output_files_exist(self.output_dir, a.output_name)
            if existing:
                raise ConfigError(f"--output_dir {self.output_dir} already has {existing[0].name} from an earlier run; "
                                  "use another --output_name, --resume it, or pass --overwrite")
        self.network_module = import_network_module(a.network_module)
        self.spec = check_optimizer_settings(a)
        self.dataset = build_dataset(a)
        self.validation_dataset = build_dataset(a, split="validation")
        check_writable(self.output_dir)  # last checks before the expensive part
        check_output_names(self.output_dir, a.output_name)

    def setup(self) -> None:
        a = self.args
        self.check()
        self.output_lock = OutputLock(self.output_dir, a.output_name)
        if os.environ.get("RANK", "0") == "0":  # one lock per run: the main process holds it
            self.output_lock.acquire()
            if a.overwrite and not a.resume:  # never mixed with this run's files
                set_aside(self.output_dir, a.output_name)
        try:
            self._build()
        except BaseException:
            self.output_lock.release()
            raise

    def _build(self) -> None:
        """Everything that costs time: the accelerator, the model, the network, the optimizer, a resumed state."""
        a = self.args
        from accelerate import Accelerator, InitProcessGroupKwargs

        log_with = tracker_choice(a)
        handlers = [] if a.ddp_timeout is None else [InitProcessGroupKwargs(timeout=timedelta(minutes=a.ddp_timeout))]
        self.accelerator = Accelerator(mixed_precision=a.mixed_precision, log_with=log_with, kwargs_handlers=handlers,
                                       project_dir=logging_dir_of_run(a, self.output_dir),
                                       cpu=launched_on_cpus())
        acc = self.accelerator
        if acc.is_main_process:
            batch = "/".join(str(d.batch_size) for d in self.dataset.config.datasets)  # one per dataset
            logger.info("processes: %d; effective batch: %s per process x %d processes x %d accumulation steps",
                        acc.num_processes, batch, acc.num_processes, a.gradient_accumulation_steps)
        self.device = acc.device
        if self.device.type == "cpu" and a.mixed_precision != "no":
            logger.warning("--mixed_precision %s on a CPU runs several times slower than fp32 (CPUs lack fast %s "
                           "matrix kernels): use --mixed_precision no here", a.mixed_precision, a.mixed_precision)
        self.resume_parts = None
        if a.resume:  # read and checked against this run before the model loads
            if a.resume_from_huggingface:
                a.resume = download_state(a)
                self.resume_found = resume.find_state(a.resume)
            resume.check_settings(self.resume_found, self._run_settings())
            self.resume_parts = resume.load(self.resume_found, acc.process_index)
        check_compile_device(a, self.device)
        self._mark_step = step_marker(a)
        torch.manual_seed(a.seed + acc.process_index)
        random.seed(a.seed + acc.process_index)

        self.weight_dtype = weight_dtype_for(a)
        self.model = load_model(a, self.device, self.weight_dtype)
        warn_long_captions(self.dataset, self.model.tokenizers[0], self.dataset.config.source, a.max_token_length,
                           a.weighted_captions)
        merge_base_weights(a, self.network_module, self.model, self.device)  # before caching: encoders included
        self.noise_scheduler = losses.make_noise_scheduler(self.model.scheduler_config,
                                                           v_parameterization=self.model.v_parameterization,
                                                           zero_terminal_snr=a.zero_terminal_snr)
        # schedule and SNR table on the device: a recorded (--cuda_graphs) step never copies from the host
        self.noise_scheduler.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)
        self.snr = losses.snr_table(self.model.scheduler_config).to(self.device)
        self.noise_options = losses.NoiseOptions.from_args(a)
        self.loss_options = losses.LossOptions.from_args(a, v_prediction=self.model.v_parameterization)
        self.validation = self._validation_setup()
        self.train_unet = not a.network_train_text_encoder_only
        self.train_text_encoder = not a.network_train_unet_only
        self._cache_inputs()
        store_base_in_fp8(a, self.model, self.weight_dtype)  # before the LoRA wraps the layers
        self.model.unet.to(self.device)
        if a.fused_backward_pass:
            logger.info("--fused_backward_pass: as in sd-scripts' train_network.py, a LoRA trains with the ordinary "
                        "backward and optimizer step (the fused pass exists for full fine-tuning)")

        self.network = build_network(a, self.network_module, self.model, self.train_text_encoder, self.train_unet)
        self.network.to(self.device, dtype=self.weight_dtype if (a.full_fp16 or a.full_bf16) else torch.float32)
        self.trainable = [p for p in self.network.parameters() if p.requires_grad]
        if a.gradient_checkpointing:
            # a graph being recorded cannot read the CUDA generator's state, which checkpointing saves by default
            self.model.unet.enable_gradient_checkpointing(checkpoint_without_rng_state if a.cuda_graphs else None)
            if self.train_text_encoder:
                for te in self.model.text_encoders:
                    te.gradient_checkpointing_enable()
        if a.channels_last:
            self.model.unet.to(memory_format=torch.channels_last)
        if compile_requested(a):
            self.model.unet = compile_unet(self.model.unet, a)
        self.model.unet.train()

        if a.scale_weight_norms and not hasattr(self.network, "apply_max_norm_regularization"):
            raise ConfigError(f"--scale_weight_norms: the network of --network_module {a.network_module} has no "
                              "apply_max_norm_regularization(); use networks.lora or drop the flag")
        self.max_norm_stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.optimizer, self.optimizer_desc = build_optimizer_for(a, self.network)
        self.graphed = GraphedStep(self._graph_body, self.trainable, self.device) if a.cuda_graphs else None
        self.step_in_graph = False  # decided when training starts (_record_optimizer_step)
        self._added_keys: list[str] = []
        self.base_optimizer = self.optimizer
        self.optimizer_needs = LoopNeeds(self.base_optimizer)  # Hessian passes, metrics: asked through one object
        self.world = acc.num_processes
        self.average_gradients = GradientAverager(self.trainable, self.world,
                                                  gradient_as_bucket_view=a.ddp_gradient_as_bucket_view,
                                                  static_graph=a.ddp_static_graph)
        self.keep_workers = check_persistent_workers(a)
        self.epoch_batches = EpochBatches()
        self.persistent_loader = None
        self.batches = self._epoch_batches(0)
        self.steps_per_epoch = max(1, math.ceil(len(self.batches) / a.gradient_accumulation_steps))
        if a.max_train_epochs:
            a.max_train_steps = a.max_train_epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(a.max_train_steps / self.steps_per_epoch)
        a.save_every_n_epochs = checkpoints.save_every_n_epochs(a, self.num_epochs)
        # as sd-scripts: the schedule spans steps x processes and advances once per process each step
        self.lr_scheduler = build_lr_scheduler(a, self.base_optimizer, a.max_train_steps * self.world)
        self.optimizer = acc.prepare(self.optimizer)
        self.hub = HubUploader(a)
        if self.resume_parts is not None:
            self._apply_state(self.resume_parts)
            logger.info("resumed from %s at step %d (epoch %d)", self.resume_found.folder, self.progress.global_step,
                        self.progress.epoch + 1)
            self.resume_parts = None
        self._start_at_initial_step()
        self.metadata = metadata.build_metadata(a, metadata.RunFacts(
            model_type=self.model.model_type, v_parameterization=self.model.v_parameterization,
            session_id=self.session_id, started_at=self.started_at, dataset_summary=self._dataset_summary(),
            from_dataset_config=bool(a.dataset_config), num_batches_per_epoch=len(self.batches),
            num_epochs=self.num_epochs, num_processes=self.world,
            optimizer_class=f"{type(self.base_optimizer).__module__}.{type(self.base_optimizer).__name__}",
            network_kwargs=network_kwargs_metadata(a), **dim_from_weights_metadata(a, self.network)))
        if acc.is_main_process:  # the exact estimate, now that the network and the epochs are known
            check_free_space_for_network(a, self.network, self.steps_per_epoch, start_step=self.progress.global_step)
        start_trackers(acc, a, {"optimizer": self.optimizer_desc})

    def _start_at_initial_step(self) -> None:
        """--initial_step / --initial_epoch, as sd-scripts: with --skip_until_initial_step the run continues from
        that step (the batches before it are drawn and discarded); without it only the epoch count starts there,
        and the run stops at the last epoch. They override the step of a --resume state."""
        a = self.args
        start = checkpoints.initial_step(a, self.steps_per_epoch)
        if not start:
            return
        if start >= a.max_train_steps:
            flag = "--initial_step" if a.initial_step is not None else "--initial_epoch"
            raise ConfigError(f"{flag}: the run would start at step {start}, not below --max_train_steps "
                              f"{a.max_train_steps}")
        if a.resume:
            logger.warning("--initial_step/--initial_epoch given: the step saved in %s is not used", a.resume)
        epoch, into_epoch = divmod(start, self.steps_per_epoch)
        if a.skip_until_initial_step:
            skipped = min(into_epoch * a.gradient_accumulation_steps, len(self.batches))
            self.progress.load_state_dict({"global_step": start, "epoch": epoch, "batches_done_in_epoch": skipped})
            logger.info("skipping %d steps: starting at step %d, epoch %d", start, start, epoch + 1)
        else:
            self.progress.load_state_dict({"global_step": 0, "epoch": epoch, "batches_done_in_epoch": 0})
            logger.info("starting at epoch %d (--initial_step without --skip_until_initial_step skips no data)",
                        epoch + 1)

    def _cache_inputs(self) -> None:
        """Encode images (and captions) once when asked to; the VAE/text encoders then leave the GPU."""
        a, m = self.args, self.model
        self.cached_text: dict[str, conditioning.Conditioning] = {}
        if a.cache_latents or a.cache_latents_to_disk:
            vae = m.vae

            @torch.no_grad()
            def encode(pixels: torch.Tensor) -> torch.Tensor:
                pixels = pixels.to(self.device, vae.dtype)
                return vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor

            tag = vae_fingerprint(vae) if a.cache_latents_to_disk else ""  # the weights decide, not the path
            logger.info("caching latents of %d images%s", len(self.dataset),
                        " (reusing the .npz files that still match)" if a.cache_latents_to_disk else "")
            for dataset in filter(None, (self.dataset, self.validation_dataset)):
                dataset.cache_latents(encode, to_disk=a.cache_latents_to_disk, batch_size=a.vae_batch_size,
                                      cache_tag=tag, skip_cache_check=a.skip_cache_check,
                                      latent_factor=2 ** (len(vae.config.block_out_channels) - 1),
                                      latent_channels=vae.config.latent_channels)
            vae.to("cpu")
            logger.info("cached latents of %d images", len(self.dataset))
        if a.cache_text_encoder_outputs:
            @torch.no_grad()
            def encode_caption(caption: str) -> conditioning.Conditioning:
                return conditioning.encode_prompts(m, [caption], a.clip_skip, self.device,
                                                   max_token_length=a.max_token_length, weighted=a.weighted_captions)

            datasets = list(filter(None, (self.dataset, self.validation_dataset)))
            if a.cache_text_encoder_outputs_to_disk:
                from library.training.text_cache import cached_outputs

                tag = (f"{a.pretrained_model_name_or_path}|clip_skip={a.clip_skip}|base_weights={a.base_weights}"
                       f"|max_token_length={a.max_token_length}|weighted={a.weighted_captions}")
                items = sorted({(d.image_path(i), d.caption_for_cache(i)) for d in datasets for i in range(len(d))})
                cached, encoded = cached_outputs(items, encode_caption, tag)
                self.cached_text = {c: v.to(self.device) for c, v in cached.items()}
                logger.info("text-encoder outputs of %d captions: %d read from *_te_outputs.npz, %d encoded",
                            len(cached), len(cached) - encoded, encoded)
            else:
                captions = sorted({d.caption_for_cache(i) for d in datasets for i in range(len(d))})
                self.cached_text = {c: encode_caption(c) for c in captions}
                logger.info("cached text-encoder outputs of %d captions", len(captions))
            for te in m.text_encoders:  # not trained (--network_train_unet_only): no reason to hold device memory
                te.to("cpu")
        release_cached_memory(self.device, highvram=a.highvram)

    def _validation_setup(self) -> ValidationLoss | None:
        a = self.args
        if self.validation_dataset is None:
            return None
        batches = len(self.validation_dataset.batch_sampler(seed=a.seed, shuffle=False))
        return ValidationLoss(batches, seed=a.seed if a.validation_seed is None else a.validation_seed,
                              num_train_timesteps=self.noise_scheduler.config.num_train_timesteps,
                              min_timestep=getattr(a, "min_timestep", None), max_timestep=getattr(a, "max_timestep", None),
                              every_n_steps=a.validate_every_n_steps, every_n_epochs=a.validate_every_n_epochs,
                              max_steps=a.max_validation_steps)

    def _validate(self, kind: str) -> None:
        """A validation pass with the network in eval mode (dropout off, schedule-free's averaged weights)."""
        if self.validation is None:
            return
        self._optimizer_mode("eval")
        self.network.eval()
        loader = torch.utils.data.DataLoader(
            self.validation_dataset, batch_sampler=list(self.validation_dataset.batch_sampler(seed=self.args.seed,
                                                                                              shuffle=False)),
            collate_fn=collate, num_workers=self.args.max_data_loader_n_workers)
        logs = self.validation.run(kind, self.progress.epoch, loader, self._validation_loss, self.device)
        log_scalars(self.accelerator, logs, step_value=self.progress.global_step, global_step=self.progress.global_step,
                    epoch=self.progress.epoch + 1)
        self.network.train()
        self._optimizer_mode("train")

    def _validation_loss(self, batch: dict, timestep: int) -> torch.Tensor:
        latents = self._latents(batch)
        timesteps = torch.full((latents.shape[0],), timestep, device=self.device, dtype=torch.long)
        loss, _ = self._loss(latents, self._conditioning(batch), self._loss_weights(batch), self._mask(batch),
                             self.accelerator.autocast(), timesteps)
        return loss

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This process's batches of an epoch: deterministic from (seed, epoch), split across processes."""
        self.dataset.set_epoch(epoch)
        sampler = self.dataset.batch_sampler(seed=self.args.seed, shuffle=True)
        sampler.set_epoch(epoch)
        batches = list(sampler)
        usable = len(batches) // self.world * self.world
        if usable == 0:
            raise ConfigError(f"the dataset gives {len(batches)} batches per epoch, fewer than the {self.world} processes")
        mine = batches[self.accelerator.process_index:usable:self.world]
        self.epoch_sample_steps = None
        if self.dataset.uses_token_warmup():  # token warm-up grows captions with the optimizer step
            self.epoch_sample_steps = sample_steps(mine, epoch, self.args.gradient_accumulation_steps)
            self.dataset.set_sample_steps(self.epoch_sample_steps, self.args.max_train_steps)
        return mine

    def _loader(self, epoch: int, batches: list[list[int]]) -> torch.utils.data.DataLoader:
        """This epoch's batches; with --persistent_data_loader_workers one loader (and its workers) for all."""
        a = self.args
        if not self.keep_workers:
            return torch.utils.data.DataLoader(
                self.dataset, batch_sampler=batches, collate_fn=collate, num_workers=a.max_data_loader_n_workers,
                pin_memory=self.device.type == "cuda", generator=torch.Generator())
        self.epoch_batches.set(epoch, batches, self.epoch_sample_steps)
        if self.persistent_loader is None:
            self.persistent_loader = torch.utils.data.DataLoader(
                EpochIndexed(self.dataset, a.max_train_steps), batch_sampler=self.epoch_batches, collate_fn=collate,
                num_workers=a.max_data_loader_n_workers, persistent_workers=True,
                pin_memory=self.device.type == "cuda", generator=torch.Generator())
        return self.persistent_loader

    # ------------------------------------------------------------------ step
    def _latents(self, batch: dict) -> torch.Tensor:
        if "latents" in batch:
            return batch["latents"].to(self.device, non_blocking=True).to(self.weight_dtype)
        vae = self.model.vae
        with torch.no_grad():
            pixels = batch["pixel_values"].to(self.device, non_blocking=True).to(vae.dtype)
            return (vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor).to(self.weight_dtype)

    def _conditioning(self, batch: dict) -> conditioning.Conditioning:
        captions = batch["caption"]
        if self.cached_text:
            parts = [self.cached_text[c] for c in captions]
            hidden = torch.cat([p.encoder_hidden_states for p in parts])
            extra = None
            if parts[0].added_cond_kwargs is not None:
                extra = {k: torch.cat([p.added_cond_kwargs[k] for p in parts]) for k in parts[0].added_cond_kwargs}
            cond = conditioning.Conditioning(hidden, extra)
        else:
            with torch.set_grad_enabled(self.train_text_encoder):
                cond = conditioning.encode_prompts(self.model, captions, self.args.clip_skip, self.device,
                                                   max_token_length=self.args.max_token_length,
                                                   weighted=self.args.weighted_captions)
        if cond.added_cond_kwargs is not None:  # SDXL: each image's own original size, crop and bucket
            cond.added_cond_kwargs["time_ids"] = conditioning.sdxl_time_ids(
                batch["original_size"], batch["crop_top_left"], batch["bucket"], self.device)
        return cond.to(self.device, self.weight_dtype)

    def _unet_forward(self, latents, noise, timesteps, cond):
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        self._mark_step()
        with self._offload_saved_activations():
            return self.model.unet(noisy, timesteps, cond.encoder_hidden_states,
                                   added_cond_kwargs=cond.added_cond_kwargs).sample

    def _offload_saved_activations(self):
        """--cpu_offload_checkpointing: what autograd keeps for backward (with --gradient_checkpointing, the
        blocks' inputs) waits in pinned host memory instead of VRAM."""
        a = self.args
        if a.cpu_offload_checkpointing and a.gradient_checkpointing and self.model.unet.training:
            return torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")
        return contextlib.nullcontext()

    def _loss_weights(self, batch: dict) -> torch.Tensor:
        # built on the host and copied without blocking: no host sync in the step
        is_reg = torch.as_tensor(batch["is_reg"])
        return torch.where(is_reg, self.args.prior_loss_weight, 1.0).float().to(self.device, non_blocking=True)

    def _mask(self, batch: dict) -> torch.Tensor | None:
        """The batch's loss masks [B, 1, H, W] in [0, 1] (alpha channel or conditioning image), if any."""
        mask = batch.get("mask")
        return None if mask is None else mask.to(self.device, non_blocking=True)

    def _loss(self, latents: torch.Tensor, cond: conditioning.Conditioning, weights: torch.Tensor,
              mask: torch.Tensor | None, autocast, timesteps: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise, timesteps (random unless given), the U-Net's prediction and the weighted loss; returns (loss,
        timesteps)."""
        schedule, noise_opts, loss_opts = self.noise_scheduler, self.noise_options, self.loss_options
        steps = schedule.config.num_train_timesteps
        noise = losses.sample_noise(latents, noise_opts)
        if timesteps is None:
            timesteps = losses.sample_timesteps(latents.shape[0], noise_opts, steps, self.device)
        with autocast:
            pred = self._unet_forward(latents, losses.perturbed_noise(noise, noise_opts), timesteps, cond)
        target = losses.training_target(schedule, latents, noise, timesteps)
        loss = losses.diffusion_loss(
            pred, target, sample_weights=weights, mask=mask, loss_type=loss_opts.loss_type,
            huber_c=losses.huber_threshold(timesteps, schedule.alphas_cumprod, loss_opts, steps),
            weights=losses.timestep_weights(timesteps, self.snr, loss_opts))
        return loss, timesteps

    def compute_loss(self, batch: dict) -> torch.Tensor:
        latents = self._latents(batch)
        cond = self._conditioning(batch)
        loss, timesteps = self._loss(latents, cond, self._loss_weights(batch), self._mask(batch),
                                     self.accelerator.autocast())
        self._last_inputs = (latents, timesteps, batch)
        return loss

    def forward_backward(self, batch: dict) -> torch.Tensor:
        """One micro-batch: gradients accumulated into the trainable parameters; returns the detached loss."""
        if self.graphed is None:
            loss = self.compute_loss(batch)
            self.accelerator.backward(loss / self.args.gradient_accumulation_steps)
            return loss.detach()
        latents, cond = self._latents(batch), self._conditioning(batch)
        added = cond.added_cond_kwargs or {}
        self._added_keys = sorted(added)
        mask = self._mask(batch)
        loss, timesteps = self.graphed(latents, cond.encoder_hidden_states, self._loss_weights(batch),
                                       torch.empty(0, device=self.device) if mask is None else mask,
                                       *(added[k] for k in self._added_keys))
        self._last_inputs = (latents, timesteps, batch)
        return loss

    def _graph_body(self, latents: torch.Tensor, hidden: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor,
                    *added: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What --cuda_graphs records: loss and backward from static inputs (autocast without its weight cache,
        whose casts would outlive the recording). An empty `mask` means no loss mask (its shape is the signature)."""
        from accelerate.utils import AutocastKwargs

        cond = conditioning.Conditioning(hidden, dict(zip(self._added_keys, added, strict=True)) if added else None)
        autocast = self.accelerator.autocast(AutocastKwargs(cache_enabled=False))
        loss, timesteps = self._loss(latents, cond, weights, mask if mask.numel() else None, autocast)
        (loss / self.args.gradient_accumulation_steps).backward()
        if self.step_in_graph:
            self._clip_and_step()
            self.graphed.zero_grads()
        return loss.detach(), timesteps

    def _clip_and_step(self) -> None:
        """--max_grad_norm (torch's foreach clip: no host sync), then the optimizer step."""
        if self.args.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.trainable, self.args.max_grad_norm)
        self.optimizer.step()

    def _record_optimizer_step(self) -> bool:
        """Whether --cuda_graphs records clip, optimizer step and gradient reset together with forward and backward
        (one graph per bucket), or only forward and backward with the optimizer stepping eagerly after each replay.
        The first needs an optimizer that keeps its step and lr on the device (torch.optim's ``capturable``),
        one optimizer step per batch, one process and no pass of the optimizer's own between steps. Logged once."""
        if self.graphed is None:
            return False
        a, needs = self.args, self.optimizer_needs
        reasons = [why for why, applies in (
            (f"{optimizer_name(a)} does not keep its step count and lr on the device", not needs.capturable),
            ("its Hessian pass runs between steps", needs.hessian_interval is not None),
            (f"--gradient_accumulation_steps {a.gradient_accumulation_steps} steps every few batches",
             a.gradient_accumulation_steps > 1),
            (f"{self.world} processes average the gradients between backward and step", self.world > 1),
        ) if applies]
        if reasons:
            logger.info("--cuda_graphs: recording forward, loss and backward; the optimizer steps eagerly after each "
                        "replay (%s)", "; ".join(reasons))
            return False
        needs.prepare_capture()
        logger.info("--cuda_graphs: recording forward, loss, backward, gradient clipping, the optimizer step and the "
                    "gradient reset as one graph per bucket")
        return True

    def _sync_gradients(self) -> None:
        if self.world > 1:
            self.average_gradients()

    def _hessian_update(self) -> None:
        """Gauss-Newton-Bartlett Hessian estimate (SophiaG) from targets sampled around the model's own
        prediction, on the steps the optimizer asks for it."""
        needs = self.optimizer_needs
        if not needs.hessian_due(self.progress.global_step):
            return
        latents, timesteps, batch = self._last_inputs
        cond = self._conditioning(batch)  # encoded again: the step's backward freed the text encoders' graph
        noise = torch.randn_like(latents)
        with self.accelerator.autocast():
            pred = self._unet_forward(latents, noise, timesteps, cond).float()
        sampled = pred.detach() + torch.randn_like(pred)
        gnb_loss = 0.5 * ((pred - sampled) ** 2).sum() / pred.shape[0]
        gnb_loss.backward()
        needs.update_hessian(batch_size=pred.shape[0])
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        from tqdm.contrib.logging import logging_redirect_tqdm

        try:  # log lines go above the progress bar instead of through it
            with self._stop_signals_save(), logging_redirect_tqdm():
                self._train()
        finally:
            self.output_lock.release()

    def _train(self) -> None:
        a, acc = self.args, self.accelerator
        logger.info("training: %d steps, %d per epoch, from step %d (Ctrl-C saves and stops)", a.max_train_steps,
                    self.steps_per_epoch, self.progress.global_step)
        bar = Progress(a, total=a.max_train_steps, initial=self.progress.global_step, enabled=acc.is_local_main_process,
                       device=self.device, accelerator=acc, output_dir=self.output_dir)
        check_every = 1 if self.device.type == "cpu" else a.log_every_n_steps
        loss_sum = torch.zeros((), device=self.device)
        loss_count = 0
        self.good_weights, self.good_step = self._snapshot(), self.progress.global_step
        self.step_in_graph = self._record_optimizer_step()
        try:
            if a.sample_at_first and self.progress.global_step == 0:
                self.sample_images()
            self._optimizer_mode("train")
            report_compile, loop_start = compile_requested(a), time.perf_counter()
            while self.progress.global_step < a.max_train_steps and self.progress.epoch < self.num_epochs:
                epoch = self.progress.epoch
                bar.set_epoch(epoch + 1, self.num_epochs)
                logs_in_epoch = 0
                batches = self._epoch_batches(epoch)
                start = self.progress.batches_done_in_epoch
                loader = self._loader(epoch, batches[start:])
                for i, batch in enumerate(loader, start=start):
                    loss = self.forward_backward(batch)
                    loss_sum += loss
                    loss_count += 1
                    if self.validation is not None:
                        self.validation.train.add(epoch=epoch, step=i, loss=loss.clone())  # graphs reuse `loss`
                    micro_done = i + 1
                    if micro_done % a.gradient_accumulation_steps and micro_done != len(batches):
                        continue
                    if not self.step_in_graph:  # else the replay stepped and reset the gradients
                        self._sync_gradients()
                        self._clip_and_step()
                    for _ in range(self.world):
                        self.lr_scheduler.step()  # a device lr (recorded step) is filled in place
                    if not self.step_in_graph:
                        self.optimizer.zero_grad(set_to_none=True)
                    if a.scale_weight_norms:  # (keys scaled, mean norm, max norm), read on logging steps only
                        self.max_norm_stats = self.network.apply_max_norm_regularization(a.scale_weight_norms,
                                                                                         self.device)
                    self.progress.global_step += 1
                    self.progress.batches_done_in_epoch = micro_done
                    self._hessian_update()
                    step = self.progress.global_step
                    if report_compile:  # the first step of this run compiled the U-Net
                        report_compile = False
                        logger.info("first step, including torch.compile: %.1f s", time.perf_counter() - loop_start)

                    checkpoint_step = step % check_every == 0 or step == a.max_train_steps
                    stop = self.stop_signal is not None
                    if checkpoint_step or self.world > 1:  # several processes decide together, every step
                        finite, stop = self._agree_on_health(loss_sum)
                        if not finite:
                            self._diverged(step)
                    if checkpoint_step:  # checked finite just now: the last good weights
                        self.good_weights, self.good_step = self._snapshot(), step
                    if step % a.log_every_n_steps == 0 or step == a.max_train_steps:
                        bar.log(step, (loss_sum / max(loss_count, 1)).item(), {**self._lr_logs(), **self._norm_logs()},
                                epoch=epoch, position=logs_in_epoch, postfix=self._norm_postfix())
                        logs_in_epoch += 1
                        loss_sum.zero_()
                        loss_count = 0
                    bar.update(step)
                    if a.save_every_n_steps and step % a.save_every_n_steps == 0:  # the last step too, as sd-scripts
                        self._save_checkpoint(step, every=a.save_every_n_steps, by_step=True)
                    # as sd-scripts: --sample_every_n_epochs, when given, replaces --sample_every_n_steps
                    if a.sample_every_n_steps and not a.sample_every_n_epochs and step % a.sample_every_n_steps == 0:
                        self.sample_images()
                    if self.validation is not None and self.validation.due_after_step(step):
                        self._validate("step")
                    if stop:
                        self._interrupted()
                    if step >= a.max_train_steps:
                        break
                else:
                    if self.validation is not None and self.validation.due_after_epoch(epoch + 1):
                        self._validate("epoch")
                    self.progress.epoch += 1
                    self.progress.batches_done_in_epoch = 0
                    done = self.progress.epoch
                    bar.end_epoch(done, self.progress.global_step)
                    if a.save_every_n_epochs and done % a.save_every_n_epochs == 0 and done < self.num_epochs \
                            and self.progress.global_step < a.max_train_steps:
                        self._save_checkpoint(done, every=a.save_every_n_epochs, by_step=False)
                    if a.sample_every_n_epochs and done % a.sample_every_n_epochs == 0:
                        self.sample_images()
                    continue
                if self.validation is not None and self.validation.due_after_epoch(epoch + 1):
                    self._validate("epoch")  # sd-scripts validates the last, stopped epoch too
                bar.end_epoch(self.progress.epoch + 1, self.progress.global_step)  # the last, maybe partial, epoch
                break
            final = self.save(a.output_name, state=a.save_state or a.save_state_on_train_end, epoch=self.num_epochs,
                              last=True)
        finally:
            bar.close()
        acc.wait_for_everyone()
        acc.end_training()
        if acc.is_main_process:
            logger.info("done: %d steps; LoRA -> %s%s%s", self.progress.global_step, final,
                        f"; state -> {self.output_dir / checkpoints.state_name(a.output_name)}"
                        if a.save_state or a.save_state_on_train_end else "",
                        f"; logs -> {acc.project_dir}" if acc.trackers else "")

    # ------------------------------------------------------------------ saving and safety
    def _save_checkpoint(self, number: int, *, every: int, by_step: bool) -> None:
        """A step or epoch checkpoint (LoRA, and state with --save_state), then retire the one that falls out of
        --save_last_n_steps/epochs (--save_last_n_*_state for the state folders), as sd-scripts."""
        a = self.args
        if by_step:
            namer, remove = checkpoints.step_name, checkpoints.step_to_remove
            keep, keep_state = a.save_last_n_steps, a.save_last_n_steps_state
        else:
            namer, remove = checkpoints.epoch_name, checkpoints.epoch_to_remove
            keep, keep_state = a.save_last_n_epochs, a.save_last_n_epochs_state
        epoch = self.progress.epoch + 1 if by_step else number  # 1-based: the epoch in progress, or the one done
        self.save(namer(a.output_name, number), state=a.save_state, epoch=epoch)
        old = remove(number, every, keep)
        if old is not None and self.accelerator.is_main_process:
            retire(self.output_dir / f"{namer(a.output_name, old)}.{a.save_model_as}")
        old_state = remove(number, every, checkpoints.state_last_n(keep_state, keep))
        if a.save_state and old_state:
            retire(self._state_dir(namer(a.output_name, old_state)))

    def save(self, name: str, *, state: bool, epoch: int | None = None, last: bool = False) -> Path:
        """The LoRA file `<name>.<--save_model_as>` (and the state folder `<name>-state`), each written atomically,
        then uploaded with --huggingface_repo_id (`last`: waited for). `epoch` is the 1-based epoch recorded as
        ss_epoch (default: the one in progress). A signal during a save lets it finish."""
        self.saving = True
        try:
            return self._save(name, state=state, epoch=epoch, last=last)
        except LoraForgeError:  # a full disk, a diverged run: already one line
            raise
        except Exception as exc:  # anything else still stops in one line; atomic writes kept the earlier files
            reason = one_line(exc)
            raise ConfigError(f"could not save {name}: {type(exc).__name__}: {reason}; the files saved earlier are "
                              "kept") from exc
        finally:
            self.saving = False

    def _save(self, name: str, *, state: bool, epoch: int | None, last: bool) -> Path:
        a, acc = self.args, self.accelerator
        if not bool(self._weights_finite()):  # a save between health checks must not write a NaN LoRA
            self._diverged(self.progress.global_step)
        self._optimizer_mode("eval")
        path = self.output_dir / f"{name}.{a.save_model_as}"
        acc.wait_for_everyone()
        if acc.is_main_process:
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}.get(a.save_precision or "", None)
            md = metadata.stamp(self.metadata, steps=self.progress.global_step,
                                epoch=self.progress.epoch + 1 if epoch is None else epoch, no_metadata=a.no_metadata)
            md.update(metadata.modelspec(a, model_type=self.model.model_type,
                                         v_parameterization=self.model.v_parameterization,
                                         resolution=self.trained_resolution(),
                                         implementation_version=f"loraforge/{self.metadata['ss_sd_scripts_commit_hash']}"))
            with atomic_file(path) as tmp:
                self.network.save_weights(str(tmp), dtype, md)
            logger.info("saved %s", path)
        if state:
            state_dir = self._state_dir(name)
            if acc.is_main_process:
                parts, run = self._state_parts(), self._run_settings()
            else:  # the other processes differ only in their random streams
                parts, run = {"rng": state_io.rng_state()}, {}
            with atomic_dir(state_dir) as tmp:
                state_io.write_state(tmp, parts, run, step=self.progress.global_step)
            resume.remove_leftover_copies(state_dir)
        if acc.is_main_process:  # only once the files are complete on disk
            self.hub.upload(path, wait=last)
            if state and a.save_state_to_huggingface:
                self.hub.upload(state_dir, wait=last)
            if last:
                self.hub.wait()
        acc.wait_for_everyone()
        self._optimizer_mode("train")
        return path

    def _dataset_summary(self) -> dict:
        summary = self.dataset.summary()
        summary["num_validation_images"] = len(self.validation_dataset) if self.validation_dataset else 0
        return summary

    def _state_dir(self, name: str) -> Path:
        """This process's state folder of checkpoint `name` (other processes write `<folder>.rank<i>` beside it)."""
        folder = self.output_dir / checkpoints.state_name(name)
        acc = self.accelerator
        return folder if acc.is_main_process else folder.with_name(f"{folder.name}.rank{acc.process_index}")

    def trained_resolution(self) -> tuple[int, int]:
        """--resolution, or with --dataset_config the first dataset's (what the run trained, not the CLI default)."""
        if self.args.dataset_config:
            return tuple(self.dataset.config.datasets[0].resolution)
        return tuple(self.args.resolution)

    def _run_settings(self) -> dict:
        """What a state depends on: resuming with other values would fail to load or silently change the run."""
        from library.training.setup import parse_key_values

        a = self.args
        net_kwargs = parse_key_values(a.network_args, "--network_args")
        return {"network_module": a.network_module, "network_dim": a.network_dim, "conv_dim": net_kwargs.get("conv_dim"),
                "optimizer": optimizer_name(a), "batch_size": [d.batch_size for d in self.dataset.config.datasets],
                "gradient_accumulation_steps": a.gradient_accumulation_steps}

    def _state_parts(self) -> dict:
        parts = {"network": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "lr_scheduler": self.lr_scheduler.state_dict(), "progress": self.progress.state_dict(),
                 "rng": state_io.rng_state()}
        if self.accelerator.scaler is not None:
            parts["scaler"] = self.accelerator.scaler.state_dict()
        return parts

    def _apply_state(self, parts: dict) -> None:
        where = f"--resume {self.resume_found.folder}"
        try:
            self.network.load_state_dict(parts["network"], strict=True)
        except RuntimeError as exc:
            detail = one_line(exc, 300)
            raise ConfigError(f"{where}: its LoRA does not fit this network (other network_dim/conv_dim/"
                              f"--network_args?): {detail}") from None
        try:
            self.optimizer.load_state_dict(parts["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ConfigError(f"{where}: its optimizer state does not fit this optimizer ({exc}); resume with the "
                              "--optimizer_type and flags of that run") from None
        self.lr_scheduler.load_state_dict(parts["lr_scheduler"])
        self.progress.load_state_dict(parts["progress"])
        if "scaler" in parts and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(parts["scaler"])
        if "rng" in parts:
            state_io.set_rng_state(parts["rng"])

    def sample_images(self) -> None:
        """Samples are a view of the run, never a reason to lose it: a failure is one warning line."""
        if not self.prompts or not self.accelerator.is_main_process:
            return
        self._optimizer_mode("eval")
        self.model.unet.eval()
        self.network.eval()  # LoRA dropout follows the network's mode
        parked = [m for m in (self.model.vae, *self.model.text_encoders)
                  if m.device.type == "cpu" and self.device.type != "cpu"]
        started = time.perf_counter()
        logger.info("sampling %d prompt(s) at step %d", len(self.prompts), self.progress.global_step)
        try:
            self._sample(parked)
            logger.info("samples -> %s (%.1f s)", self.output_dir / "sample", time.perf_counter() - started)
        except Exception as exc:  # out of memory, a scheduler's refusal, a full disk: training goes on
            reason = one_line(exc)
            logger.warning("sampling at step %d failed, training goes on: %s: %s", self.progress.global_step,
                           type(exc).__name__, reason)
        finally:
            for module in parked:
                module.to("cpu")
            self.network.train()
            self.model.unet.train()
            self._optimizer_mode("train")

    def _sample(self, parked: list[torch.nn.Module]) -> None:
        from library.training import sampling
        from library.training.sample_grid import save_samples

        a = self.args
        for module in parked:  # cached latents / text-encoder outputs moved them off the device
            module.to(self.device)
        images = sampling.generate(self.model, self.prompts, a.sample_sampler, self.device, a.seed,
                                   clip_skip=a.clip_skip, max_token_length=a.max_token_length)
        save_samples(self.output_dir, a.output_name, self.progress.global_step, self.prompts, images, self.accelerator)

    def _optimizer_mode(self, mode: str) -> None:
        """Schedule-free optimizers keep two iterates: evaluate and save the averaged one."""
        fn = getattr(self.base_optimizer, mode, None)
        if callable(fn):
            fn()

    def _lr_logs(self) -> dict[str, float]:
        logs = lr_logs(self.base_optimizer.param_groups, unet_only=not self.train_text_encoder)
        return {**logs, **self.optimizer_needs.metrics()}

    def _norm_logs(self) -> dict[str, float]:
        """--scale_weight_norms under sd-scripts' tracker names."""
        if self.max_norm_stats is None:
            return {}
        keys_scaled, mean_norm, max_norm = (float(x) for x in self.max_norm_stats)
        return {"max_norm/keys_scaled": keys_scaled, "max_norm/max_key_norm": max_norm, "norm/avg_key_norm": mean_norm}

    def _norm_postfix(self) -> dict[str, str]:
        """sd-scripts' progress-bar fields for --scale_weight_norms."""
        logs = self._norm_logs()
        if not logs:
            return {}
        return {"Keys Scaled": f"{logs['max_norm/keys_scaled']:.0f}", "Average key norm": f"{logs['norm/avg_key_norm']:.4f}"}

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.trainable]

    def _weights_finite(self) -> torch.Tensor:
        """One device-side answer: a finite loss can still come with inf weights (an inf lr's first update)."""
        norms = torch._foreach_norm([p.detach() for p in self.trainable])  # inf/nan anywhere -> inf/nan norm
        return torch.isfinite(torch.stack(norms)).all()

    def _agree_on_health(self, loss_sum: torch.Tensor) -> tuple[bool, bool]:
        """(every process's loss and weights finite, some process asked to stop). One answer for all processes: a
        rank that saved alone would wait in the save's barrier while the others wait in the next gradient
        all-reduce."""
        finite = torch.isfinite(loss_sum) & self._weights_finite()
        if self.world == 1:
            return bool(finite.item()), self.stop_signal is not None
        flags = torch.stack([finite.logical_not().float(), torch.tensor(float(self.stop_signal is not None))
                             .to(loss_sum.device)])
        torch.distributed.all_reduce(flags)
        bad, stop = flags.tolist()
        if stop and self.stop_signal is None:
            self.stop_signal = "a signal to another process"
        return bad == 0, stop > 0

    def _diverged(self, step: int) -> None:
        """Put back the last weights checked finite (taken before the first bad update), save them, stop."""
        good_step = self.good_step
        with torch.no_grad():
            for p, w in zip(self.trainable, self.good_weights, strict=True):
                p.copy_(w)
        self.progress.global_step = good_step
        path = self.save(f"{self.args.output_name}-step{good_step:08d}-lastgood", state=False)
        raise TrainingStopped(f"loss or weights became NaN/inf between step {good_step} and step {step}; the LoRA of step "
                              f"{good_step} is saved as {path}. Lower --learning_rate, set --max_grad_norm, or use "
                              "--mixed_precision bf16", exit_code=3)

    @contextlib.contextmanager
    def _stop_signals_save(self):
        """Ctrl-C / SIGTERM ask for a save after the current step; the caller's handlers come back afterwards
        (a process that trains twice, or a test runner, must not keep ignoring SIGTERM)."""
        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.saving:
                logger.warning("%s received: the save in progress finishes first, then training stops", name)
                self.stop_signal = self.stop_signal or name
                return
            if self.stop_signal:  # a second signal: stop now
                raise TrainingStopped(f"stopped by a second {name} at step {self.progress.global_step} without "
                                      "saving; the files saved earlier are kept",
                                      exit_code=130 if name == "SIGINT" else 143)
            self.stop_signal = name
            logger.warning("%s received: saving after this step (press Ctrl-C again to stop without saving)", name)

        if not threading_main():
            yield
            return
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _interrupted(self) -> None:
        a = self.args
        path = self.save(a.output_name, state=True)
        state = self.output_dir / checkpoints.state_name(a.output_name)
        code = 130 if self.stop_signal == "SIGINT" else 143
        raise TrainingStopped(f"stopped by {self.stop_signal} at step {self.progress.global_step}; LoRA saved to {path}, "
                              f"state to {state}. Resume with the same command plus --resume {state}", exit_code=code)


def sample_steps(batches: list[list[int]], epoch: int, accumulate: int) -> dict[int, int]:
    """Sample index -> the optimizer steps done before its batch trains (sd-scripts' `current_step`): every epoch
    has the same ceil(batches / accumulate) steps, and a step follows each `accumulate` batches."""
    first = epoch * math.ceil(len(batches) / accumulate)
    return {i: first + j // accumulate for j, batch in enumerate(batches) for i in batch}


def release_cached_memory(device: torch.device, *, highvram: bool) -> None:
    """After the caches are built, hand the memory the encoders used back to the driver before the U-Net arrives,
    as sd-scripts does; --highvram keeps PyTorch's cache for the next allocation instead."""
    if device.type == "cuda" and not highvram:
        torch.cuda.empty_cache()


def retire(path: Path) -> None:
    """Remove a checkpoint file or state folder that a newer one replaced (--save_last_n_*)."""
    if path.is_dir():
        logger.info("removing old state: %s", path)
        shutil.rmtree(path)
    elif path.exists():
        logger.info("removing old checkpoint: %s", path)
        path.unlink()


def network_kwargs_metadata(args: argparse.Namespace) -> dict:
    """--network_args as sd-scripts records them: values as given (strings), plus `dropout` (its --network_dropout,
    which sd-scripts passes to every network module) when --dim_from_weights is not used."""
    kwargs = dict(item.split("=", 1) for item in args.network_args or [] if "=" in item)
    if not args.dim_from_weights:
        kwargs.setdefault("dropout", args.network_dropout)
    return kwargs


def dim_from_weights_metadata(args: argparse.Namespace, network) -> dict:
    """With --dim_from_weights the rank and alpha are the file's, not --network_dim/--network_alpha: record those
    (the network's own lora_dim/alpha where create_network_from_weights set them — the most common pair of the
    file's modules, OFT's blocks and constraint — else the largest rank and its alpha)."""
    if not args.dim_from_weights:
        return {}
    dim, alpha = getattr(network, "lora_dim", None), getattr(network, "alpha", None)
    if isinstance(dim, int) and isinstance(alpha, (int, float)):  # create_network_from_weights states the file's
        return {"network_dim": dim, "network_alpha": float(alpha)}
    modules = list(getattr(network, "text_encoder_loras", [])) + list(getattr(network, "unet_loras", []))
    if not modules:
        return {}
    widest = max(modules, key=lambda m: m.lora_dim)
    return {"network_dim": widest.lora_dim, "network_alpha": round(widest.scale * widest.lora_dim, 6)}


def launched_on_cpus() -> bool:
    """Several processes (torchrun / accelerate launch --multi_gpu) on a machine without CUDA: accelerate joins
    them through gloo only when told to use the CPU; otherwise each process would train alone, on all the data,
    into the same files."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(args: argparse.Namespace) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.debug_dataset:  # sd-scripts: show the samples, train nothing
        from library.data.debug import print_dataset

        validate_args(args)
        print_dataset(build_dataset(args), seed=args.seed)
        return
    trainer = LoRATrainer(args)
    trainer.setup()
    trainer.train()

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
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from library.data.dataset import collate
from library.errors import ConfigError, LoraForgeError
from library.optimizers.loop import LoopNeeds
from library.training import conditioning, losses
from library.training.atomic import atomic_dir, atomic_file, check_writable
from library.training.compile import check_compile_device, compile_requested, compile_unet, step_marker
from library.training.graphed_step import GraphedStep, checkpoint_without_rng_state
from library.training.metadata import build_metadata
from library.training.progress import Progress
from library.training.setup import (
    build_dataset,
    build_lr_scheduler,
    build_network,
    build_optimizer_for,
    check_optimizer_settings,
    load_model,
    weight_dtype_for,
)
from library.training.validate import (
    check_free_space_for_network,
    import_network_module,
    output_files_exist,
    validate_args,
)

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

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        a = self.args
        validate_args(a)
        if not a.overwrite and not a.resume:
            existing = output_files_exist(self.output_dir, a.output_name)
            if existing:
                raise ConfigError(f"--output_dir {self.output_dir} already has {existing[0].name} from an earlier run; "
                                  "use another --output_name, --resume it, or pass --overwrite")
        self.network_module = import_network_module(a.network_module)
        self.spec = check_optimizer_settings(a)
        self.dataset = build_dataset(a)
        check_writable(self.output_dir)  # last check before the expensive part

        from accelerate import Accelerator, InitProcessGroupKwargs

        # sd-scripts: a --logging_dir alone means tensorboard; "none" turns trackers off
        log_with = None if a.log_with == "none" else a.log_with or ("tensorboard" if a.logging_dir else None)
        handlers = [] if a.ddp_timeout is None else [InitProcessGroupKwargs(timeout=timedelta(minutes=a.ddp_timeout))]
        self.accelerator = Accelerator(mixed_precision=a.mixed_precision, log_with=log_with, kwargs_handlers=handlers,
                                       project_dir=a.logging_dir or str(self.output_dir / "logs"),
                                       cpu=launched_on_cpus())
        acc = self.accelerator
        if acc.is_main_process:
            batch = "/".join(str(d.batch_size) for d in self.dataset.config.datasets)  # one per dataset
            logger.info("processes: %d; effective batch: %s per process x %d processes x %d accumulation steps",
                        acc.num_processes, batch, acc.num_processes, a.gradient_accumulation_steps)
        self.device = acc.device
        check_compile_device(a, self.device)
        self._mark_step = step_marker(a)
        torch.manual_seed(a.seed + acc.process_index)
        random.seed(a.seed + acc.process_index)

        self.weight_dtype = weight_dtype_for(a)
        self.model = load_model(a, self.device, self.weight_dtype)
        self.noise_scheduler = losses.make_noise_scheduler(self.model.scheduler_config,
                                                           v_parameterization=self.model.v_parameterization,
                                                           zero_terminal_snr=a.zero_terminal_snr)
        self.train_unet = not a.network_train_text_encoder_only
        self.train_text_encoder = not a.network_train_unet_only
        self._cache_inputs()
        self.model.unet.to(self.device)

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

        self.optimizer, self.optimizer_desc = build_optimizer_for(a, self.network)
        self.graphed = GraphedStep(self._graph_body, self.trainable, self.device) if a.cuda_graphs else None
        self._added_keys: list[str] = []
        self.base_optimizer = self.optimizer
        self.optimizer_needs = LoopNeeds(self.base_optimizer)  # Hessian passes, metrics: asked through one object
        self.world = acc.num_processes
        self.batches = self._epoch_batches(0)
        self.steps_per_epoch = max(1, math.ceil(len(self.batches) / a.gradient_accumulation_steps))
        if a.max_train_epochs:
            a.max_train_steps = a.max_train_epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(a.max_train_steps / self.steps_per_epoch)
        self.lr_scheduler = build_lr_scheduler(a, self.base_optimizer, a.max_train_steps)
        self.optimizer = acc.prepare(self.optimizer)
        acc.register_for_checkpointing(self.network, self.lr_scheduler, self.progress)
        if a.resume:
            acc.load_state(a.resume)
            logger.info("resumed from %s at step %d (epoch %d)", a.resume, self.progress.global_step, self.progress.epoch + 1)
        if acc.is_main_process:  # the exact estimate, now that the network and the epochs are known
            check_free_space_for_network(a, self.network, self.steps_per_epoch, start_step=self.progress.global_step)
        if acc.is_main_process and log_with:
            acc.init_trackers((a.log_prefix or "") + "network_train", config={"optimizer": self.optimizer_desc})

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

            self.dataset.cache_latents(encode, to_disk=a.cache_latents_to_disk, batch_size=a.train_batch_size,
                                       cache_tag=a.pretrained_model_name_or_path)
            vae.to("cpu")
            logger.info("cached latents of %d images", len(self.dataset))
        if a.cache_text_encoder_outputs:
            captions = sorted({self.dataset.caption_for_cache(i) for i in range(len(self.dataset))})
            with torch.no_grad():
                for c in captions:
                    self.cached_text[c] = conditioning.encode_prompts(m, [c], a.clip_skip, self.device,
                                                                      max_token_length=a.max_token_length,
                                                                      weighted=a.weighted_captions)
            for te in m.text_encoders:  # not trained (--network_train_unet_only): no reason to hold device memory
                te.to("cpu")
            logger.info("cached text-encoder outputs of %d captions", len(captions))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand what the encoders used back before the U-Net arrives

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
        if self.dataset.uses_token_warmup():  # token warm-up grows captions with the optimizer step
            self.dataset.set_sample_steps(sample_steps(mine, epoch, self.args.gradient_accumulation_steps),
                                          self.args.max_train_steps)
        return mine

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
        return self.model.unet(noisy, timesteps, cond.encoder_hidden_states, added_cond_kwargs=cond.added_cond_kwargs).sample

    def _loss_weights(self, batch: dict) -> torch.Tensor:
        # built on the host and copied without blocking: no host sync in the step
        is_reg = torch.as_tensor(batch["is_reg"])
        return torch.where(is_reg, self.args.prior_loss_weight, 1.0).float().to(self.device, non_blocking=True)

    def _loss(self, latents: torch.Tensor, cond: conditioning.Conditioning, weights: torch.Tensor,
              autocast) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise, timesteps, the U-Net's prediction and the weighted loss; returns (loss, timesteps)."""
        a = self.args
        noise = losses.sample_noise(latents, a.noise_offset)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=self.device)
        with autocast:
            pred = self._unet_forward(latents, noise, timesteps, cond)
        target = losses.training_target(self.noise_scheduler, latents, noise, timesteps)
        loss = losses.diffusion_loss(pred, target, timesteps, self.noise_scheduler, loss_weights=weights,
                                     min_snr_gamma=a.min_snr_gamma,
                                     scale_v_pred_loss_like_noise_pred=a.scale_v_pred_loss_like_noise_pred)
        return loss, timesteps

    def compute_loss(self, batch: dict) -> torch.Tensor:
        latents = self._latents(batch)
        cond = self._conditioning(batch)
        loss, timesteps = self._loss(latents, cond, self._loss_weights(batch), self.accelerator.autocast())
        self._last_inputs = (latents, timesteps, cond)
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
        loss, timesteps = self.graphed(latents, cond.encoder_hidden_states, self._loss_weights(batch),
                                       *(added[k] for k in self._added_keys))
        self._last_inputs = (latents, timesteps, cond)
        return loss

    def _graph_body(self, latents: torch.Tensor, hidden: torch.Tensor, weights: torch.Tensor,
                    *added: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What --cuda_graphs records: loss and backward from static inputs (autocast without its weight cache,
        whose casts would outlive the recording)."""
        from accelerate.utils import AutocastKwargs

        cond = conditioning.Conditioning(hidden, dict(zip(self._added_keys, added, strict=True)) if added else None)
        autocast = self.accelerator.autocast(AutocastKwargs(cache_enabled=False))
        loss, timesteps = self._loss(latents, cond, weights, autocast)
        (loss / self.args.gradient_accumulation_steps).backward()
        return loss.detach(), timesteps

    def _sync_gradients(self) -> None:
        if self.world > 1:
            average_gradients(self.trainable, self.world)

    def _hessian_update(self) -> None:
        """Gauss-Newton-Bartlett Hessian estimate (SophiaG) from targets sampled around the model's own
        prediction, on the steps the optimizer asks for it."""
        needs = self.optimizer_needs
        if not needs.hessian_due(self.progress.global_step):
            return
        latents, timesteps, cond = self._last_inputs
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
        with self._stop_signals_save():
            self._train()

    def _train(self) -> None:
        a, acc = self.args, self.accelerator
        logger.info("training: %d steps, %d per epoch, from step %d (Ctrl-C saves and stops)", a.max_train_steps,
                    self.steps_per_epoch, self.progress.global_step)
        bar = Progress(a, total=a.max_train_steps, initial=self.progress.global_step, enabled=acc.is_local_main_process,
                       device=self.device, accelerator=acc, output_dir=self.output_dir)
        check_every = 1 if self.device.type == "cpu" else a.log_every_n_steps
        loss_sum = torch.zeros((), device=self.device)
        loss_count = 0
        good_weights = self._snapshot()
        good_step = self.progress.global_step
        try:
            if a.sample_at_first and self.progress.global_step == 0:
                self.sample_images()
            self._optimizer_mode("train")
            report_compile, loop_start = compile_requested(a), time.perf_counter()
            while self.progress.global_step < a.max_train_steps and self.progress.epoch < self.num_epochs:
                epoch = self.progress.epoch
                batches = self._epoch_batches(epoch)
                start = self.progress.batches_done_in_epoch
                loader = torch.utils.data.DataLoader(
                    self.dataset, batch_sampler=batches[start:], collate_fn=collate,
                    num_workers=a.max_data_loader_n_workers, persistent_workers=False,
                    pin_memory=self.device.type == "cuda", generator=torch.Generator())
                for i, batch in enumerate(loader, start=start):
                    loss_sum += self.forward_backward(batch)
                    loss_count += 1
                    micro_done = i + 1
                    if micro_done % a.gradient_accumulation_steps and micro_done != len(batches):
                        continue
                    self._sync_gradients()
                    if a.max_grad_norm > 0:
                        acc.clip_grad_norm_(self.trainable, a.max_grad_norm)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
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
                            self._diverged(good_weights, good_step, step)
                    if checkpoint_step:
                        good_weights, good_step = self._snapshot(), step
                    if step % a.log_every_n_steps == 0 or step == a.max_train_steps:
                        bar.log(step, (loss_sum / max(loss_count, 1)).item(), self._lr_logs())
                        loss_sum.zero_()
                        loss_count = 0
                    bar.update(step)
                    if a.save_every_n_steps and step % a.save_every_n_steps == 0 and step < a.max_train_steps:
                        self.save(f"{a.output_name}-step{step:08d}", state=a.save_state)
                    if a.sample_every_n_steps and step % a.sample_every_n_steps == 0:
                        self.sample_images()
                    if stop:
                        self._interrupted()
                    if step >= a.max_train_steps:
                        break
                else:
                    self.progress.epoch += 1
                    self.progress.batches_done_in_epoch = 0
                    done = self.progress.epoch
                    if a.save_every_n_epochs and done % a.save_every_n_epochs == 0 and done < self.num_epochs \
                            and self.progress.global_step < a.max_train_steps:
                        self.save(f"{a.output_name}-{done:06d}", state=a.save_state)
                    if a.sample_every_n_epochs and done % a.sample_every_n_epochs == 0:
                        self.sample_images()
                    continue
                break
            final = self.save(a.output_name, state=a.save_state)
        except BaseException:  # the error line must not land on the open progress bar's line
            bar.bar.close()
            raise
        bar.close()
        acc.wait_for_everyone()
        acc.end_training()
        if acc.is_main_process:
            logger.info("done: %d steps; LoRA -> %s%s; logs -> %s", self.progress.global_step, final,
                        f"; state -> {self.output_dir / (a.output_name + '-state')}" if a.save_state else "",
                        acc.project_dir)

    # ------------------------------------------------------------------ saving and safety
    def save(self, name: str, *, state: bool) -> Path:
        a, acc = self.args, self.accelerator
        self._optimizer_mode("eval")
        path = self.output_dir / f"{name}.safetensors"
        acc.wait_for_everyone()
        if acc.is_main_process:
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}.get(a.save_precision or "", None)
            metadata = build_metadata(a, model_type=self.model.model_type, v_parameterization=self.model.v_parameterization,
                                      session_id=self.session_id, started_at=self.started_at,
                                      dataset_summary=self.dataset.summary(), optimizer_desc=self.optimizer_desc,
                                      steps=self.progress.global_step, epoch=self.progress.epoch)
            with atomic_file(path) as tmp:
                self.network.save_weights(str(tmp), dtype, metadata)
        if state:
            state_dir = self.output_dir / f"{a.output_name}-state"
            if acc.is_main_process:
                with atomic_dir(state_dir) as tmp:
                    acc.save_state(str(tmp))
            else:
                acc.save_state(str(state_dir.with_name(state_dir.name + f".rank{acc.process_index}")))
        acc.wait_for_everyone()
        self._optimizer_mode("train")
        return path

    def sample_images(self) -> None:
        a = self.args
        if not a.sample_prompts or not self.accelerator.is_main_process:
            return
        from library.training import sampling
        from library.training.sample_grid import save_samples

        self._optimizer_mode("eval")
        self.model.unet.eval()
        self.network.eval()  # LoRA dropout follows the network's mode
        prompts = sampling.load_prompts(a.sample_prompts, a.resolution)
        parked = [m for m in (self.model.vae, *self.model.text_encoders)
                  if m.device.type == "cpu" and self.device.type != "cpu"]
        for module in parked:  # cached latents / text-encoder outputs moved them off the device
            module.to(self.device)
        images = sampling.generate(self.model, prompts, a.sample_sampler, self.model.scheduler_config, self.device, a.seed,
                                   clip_skip=a.clip_skip, max_token_length=a.max_token_length)
        for module in parked:
            module.to("cpu")
        save_samples(self.output_dir, a.output_name, self.progress.global_step, prompts, images, self.accelerator)
        self.network.train()
        self.model.unet.train()
        self._optimizer_mode("train")

    def _optimizer_mode(self, mode: str) -> None:
        """Schedule-free optimizers keep two iterates: evaluate and save the averaged one."""
        fn = getattr(self.base_optimizer, mode, None)
        if callable(fn):
            fn()

    def _lr_logs(self) -> dict[str, float]:
        return self.optimizer_needs.metrics()

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.trainable]

    def _agree_on_health(self, loss_sum: torch.Tensor) -> tuple[bool, bool]:
        """(every process's loss finite, some process asked to stop). One answer for all processes: a rank that
        saved alone would wait in the save's barrier while the others wait in the next gradient all-reduce."""
        finite = torch.isfinite(loss_sum)
        if self.world == 1:
            return bool(finite.item()), self.stop_signal is not None
        flags = torch.stack([finite.logical_not().float(), torch.tensor(float(self.stop_signal is not None))
                             .to(loss_sum.device)])
        torch.distributed.all_reduce(flags)
        bad, stop = flags.tolist()
        if stop and self.stop_signal is None:
            self.stop_signal = "a signal to another process"
        return bad == 0, stop > 0

    def _diverged(self, good_weights, good_step: int, step: int) -> None:
        with torch.no_grad():
            for p, w in zip(self.trainable, good_weights, strict=True):
                p.copy_(w)
        self.progress.global_step = good_step
        path = self.save(f"{self.args.output_name}-step{good_step:08d}-lastgood", state=False)
        raise TrainingStopped(f"loss became NaN/inf between step {good_step} and step {step}; the LoRA of step "
                              f"{good_step} is saved as {path}. Lower --learning_rate, set --max_grad_norm, or use "
                              "--mixed_precision bf16", exit_code=3)

    @contextlib.contextmanager
    def _stop_signals_save(self):
        """Ctrl-C / SIGTERM ask for a save after the current step; the caller's handlers come back afterwards
        (a process that trains twice, or a test runner, must not keep ignoring SIGTERM)."""
        def handler(signum, frame):
            if self.stop_signal:  # second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.stop_signal = signal.Signals(signum).name
            logger.warning("%s received: saving after this step (press Ctrl-C again to abort without saving)", self.stop_signal)

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
        state = self.output_dir / f"{a.output_name}-state"
        code = 130 if self.stop_signal == "SIGINT" else 143
        raise TrainingStopped(f"stopped by {self.stop_signal} at step {self.progress.global_step}; LoRA saved to {path}, "
                              f"state to {state}. Resume with the same command plus --resume {state}", exit_code=code)


def sample_steps(batches: list[list[int]], epoch: int, accumulate: int) -> dict[int, int]:
    """Sample index -> the optimizer steps done before its batch trains (sd-scripts' `current_step`): every epoch
    has the same ceil(batches / accumulate) steps, and a step follows each `accumulate` batches."""
    first = epoch * math.ceil(len(batches) / accumulate)
    return {i: first + j // accumulate for j, batch in enumerate(batches) for i in batch}


def average_gradients(params: list[torch.Tensor], world: int) -> None:
    """Average LoRA gradients across processes in ONE flat all-reduce.

    The network is not wrapped in DDP: its forward is never called (the UNet's patched layers are), so DDP's
    reducer would never arm its hooks. One flat buffer is also one collective instead of hundreds.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


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
    trainer = LoRATrainer(args)
    trainer.setup()
    trainer.train()

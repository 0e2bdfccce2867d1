"""State folders that never run code and survive kill -9, a last-good LoRA that is finite, signals, samples, locks."""

from __future__ import annotations

import os
import pickle
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from library.errors import ConfigError, ModelError
from library.training import resume, state_io
from library.training.entry import main
from tests.training.conftest import train_argv
from tests.training.test_train_end_to_end import make_trainer


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ------------------------------------------------------------------------------------------------- state format
def test_state_round_trips_an_optimizer_and_rng_without_any_pickle(tmp_path):
    p = torch.nn.Parameter(torch.randn(6, 3))
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.99))
    for _ in range(2):
        p.sum().pow(2).backward()
        opt.step()
    random.seed(5)
    np.random.seed(6)
    parts = {"optimizer": opt.state_dict(), "rng": state_io.rng_state(), "progress": {"global_step": 2}}
    state_io.write_state(tmp_path, parts, {"network_dim": 4}, step=2)
    assert sorted(f.name for f in tmp_path.iterdir()) == [state_io.MANIFEST, state_io.TENSORS]
    for f in tmp_path.iterdir():  # neither file is a pickle (protocol byte 0x80) or a zip of pickles
        assert f.read_bytes()[:1] != b"\x80" and f.read_bytes()[:2] != b"PK"
    expected = (random.random(), np.random.rand(), torch.rand(1))

    back = state_io.read_state(tmp_path, state_io.read_manifest(tmp_path))
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(6, 3))], lr=1.0)
    fresh.load_state_dict(back["optimizer"])
    assert fresh.param_groups[0]["betas"] == (0.9, 0.99) and fresh.param_groups[0]["lr"] == 1e-3
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(fresh.state[fresh.param_groups[0]["params"][0]][key], opt.state[p][key])
    state_io.set_rng_state(back["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_older_accelerate_state_loads_through_the_restricted_unpickler(tmp_path):
    """sd-scripts / earlier loraforge folders: plain tensors, dicts and NumPy RNG arrays still load."""
    torch.save({"w": torch.ones(2)}, tmp_path / "custom_checkpoint_0.pkl")
    torch.save({"last_epoch": 3, "base_lrs": [1e-3]}, tmp_path / "custom_checkpoint_1.pkl")
    torch.save({"global_step": 3, "epoch": 0, "batches_done_in_epoch": 3}, tmp_path / "custom_checkpoint_2.pkl")
    torch.save({"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}, tmp_path / "optimizer.bin")
    torch.save({"random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
                "torch_manual_seed": torch.get_rng_state()}, tmp_path / "random_states_0.pkl")
    found = resume.find_state(str(tmp_path))
    assert found.manifest is None
    parts = resume.load(found, rank=0)
    assert torch.equal(parts["network"]["w"], torch.ones(2)) and parts["progress"]["global_step"] == 3
    assert np.array_equal(parts["rng"]["numpy"][1], np.random.get_state()[1])

    torch.save({"state": _Payload(tmp_path / "MARKER")}, tmp_path / "optimizer.bin")
    with pytest.raises(ConfigError, match=r"optimizer.bin: refused, .*posix.system") as err:
        resume.load(found, rank=0)
    assert not (tmp_path / "MARKER").exists() and "weights_only=False" not in str(err.value)


def test_a_checkpoint_carrying_code_is_refused_without_advising_weights_only_false(tmp_path):
    from library.models.single_file import read_checkpoint
    from networks.lora import read_lora_file

    torch.save({"state_dict": {"w": torch.ones(1)}, "x": _Payload(tmp_path / "MARKER")}, tmp_path / "model.ckpt")
    torch.save({"lora_unet_a.alpha": _Payload(tmp_path / "MARKER")}, tmp_path / "lora.pt")
    for load, path in ((read_checkpoint, tmp_path / "model.ckpt"), (read_lora_file, tmp_path / "lora.pt")):
        with pytest.raises(ModelError) as err:
            load(path)
        message = str(err.value)
        assert "refused" in message and "posix.system" in message and "\n" not in message
        assert "weights_only=False" not in message
        assert isinstance(err.value.__cause__, pickle.UnpicklingError) or err.value.__cause__ is None
    assert not (tmp_path / "MARKER").exists()


def _save_states_forever(final: Path, report: int) -> None:
    """The child: replace `final` with ever newer states, writing each finished step to the pipe `report`."""
    from library.training.atomic import atomic_dir

    for step in range(1, 1_000_000):
        with atomic_dir(final) as tmp:
            state_io.write_state(tmp, {"network": {"w": torch.full((100_000,), float(step))}}, {}, step=step)
        os.write(report, f"{step}\n".encode())


def test_kill_9_at_any_moment_of_state_saves_leaves_the_newest_complete_state(tmp_path):
    """A forked process replaces NAME-state over and over; killed at 8 moments, resume always finds a complete
    state at least as new as the last save the process finished."""
    final = tmp_path / "t-state"
    for delay in (0.0, 0.003, 0.007, 0.011, 0.02, 0.03, 0.05, 0.08):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child never returns
            try:
                _save_states_forever(final, write)
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as reports:
            reports.readline()  # the first save finished: from here on a complete state must always exist
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            done = [int(line) for line in reports.read().split()]
        found = resume.find_state(str(final))
        parts = resume.load(found, rank=0)
        assert found.step >= (done[-1] if done else 1)
        assert torch.equal(parts["network"]["w"], torch.full((100_000,), float(found.step)))


def test_kill_9_between_the_two_renames_of_a_state_save_resumes_from_the_new_state(tmp_path, caplog):
    """The moment the old folder is set aside and the new one not yet in place: the folder name is missing."""
    from library.training import atomic

    final = tmp_path / "t-state"
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        try:
            real_replace = os.replace

            def replace_then_die(src, dst):
                real_replace(src, dst)
                if Path(dst).name.startswith(".t-state.old-"):
                    os.kill(os.getpid(), signal.SIGKILL)

            atomic.os.replace = replace_then_die
            _save_states_forever(final, write)
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    os.close(read)
    assert not final.exists() and len(resume.leftover_copies(final)) == 2
    found = resume.find_state(str(final))
    assert found.folder.name.startswith(".t-state.tmp-") and found.step == 2
    assert "the newest complete state is" in caplog.text


def test_resume_takes_the_complete_copy_a_cut_save_left_and_says_where(tmp_path, caplog):
    final = tmp_path / "t-state"
    copy = tmp_path / ".t-state.tmp-4242"
    copy.mkdir()
    state_io.write_state(copy, {"progress": {"global_step": 7}}, {}, step=7)
    found = resume.find_state(str(final))
    assert found.folder == copy and found.step == 7
    assert f"the newest complete state is {copy}" in caplog.text
    half = tmp_path / "u-state"
    half.mkdir()
    (half / state_io.TENSORS).write_bytes(b"partial")
    with pytest.raises(ConfigError, match="incomplete state"):
        resume.find_state(str(half))


# ------------------------------------------------------------------------------------------------- last good LoRA
def test_lastgood_is_the_finite_lora_from_before_the_first_non_finite_update(tiny_dataset, tmp_path):
    """Step 3's update writes inf into the weights while its loss is still finite (as an inf lr did): the run
    stops and saves the weights checked after step 2, all finite."""
    from library.training.trainer import TrainingStopped

    trainer = make_trainer(train_argv(tiny_dataset, tmp_path / "out", steps=6))
    step = trainer.optimizer.step
    after_two: dict = {}

    def step_with_a_bad_third_update(*a, **k):
        out = step(*a, **k)
        if trainer.progress.global_step == 1:  # the update of step 2 just ran
            after_two.update({n: t.detach().clone() for n, t in trainer.network.state_dict().items()})
        if trainer.progress.global_step == 2:  # the update of step 3
            with torch.no_grad():
                trainer.trainable[0].fill_(float("inf"))
        return out

    trainer.optimizer.step = step_with_a_bad_third_update
    with pytest.raises(TrainingStopped) as stop:
        trainer.train()
    assert stop.value.exit_code == 3 and "between step 2 and step 3" in str(stop.value)
    saved = load_file(str(tmp_path / "out" / "t-step00000002-lastgood.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert all(torch.equal(saved[k], after_two[k].to(saved[k].dtype)) for k in saved)
    assert not (tmp_path / "out" / "t.safetensors").exists()
    assert not (tmp_path / "out" / ".t.lock").exists()  # the lock went with the run


# ------------------------------------------------------------------------------------------------- signals
def test_a_second_signal_stops_in_one_line_and_one_during_a_save_lets_it_finish(tiny_dataset, tmp_path, caplog):
    from library.cli import parse_args
    from library.training.trainer import LoRATrainer, TrainingStopped

    trainer = LoRATrainer(parse_args(train_argv(tiny_dataset, tmp_path / "out")))
    with trainer._stop_signals_save():
        handler = signal.getsignal(signal.SIGINT)
        handler(signal.SIGINT, None)
        assert trainer.stop_signal == "SIGINT"
        trainer.saving = True
        handler(signal.SIGTERM, None)  # the save goes on
        assert "the save in progress finishes first" in caplog.text
        trainer.saving = False
        with pytest.raises(TrainingStopped, match="second SIGTERM at step 0 without saving") as stop:
            handler(signal.SIGTERM, None)
        assert stop.value.exit_code == 143


def test_ctrl_c_during_set_up_is_one_line(tiny_dataset, tmp_path, monkeypatch, capsys):
    from library.training import trainer

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "build_dataset", interrupted)
    assert main(train_argv(tiny_dataset, tmp_path / "out")) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "loraforge: interrupted during set-up; nothing was trained or saved"]


# ------------------------------------------------------------------------------------------------- outputs
def test_a_second_run_into_the_same_output_name_stops_in_one_line(tiny_dataset, tmp_path, capsys):
    from library.training.output_lock import OutputLock

    out = tmp_path / "out"
    out.mkdir()
    first = OutputLock(out, "t")
    first.acquire()
    try:
        assert main(train_argv(tiny_dataset, out, "--overwrite")) == 2
    finally:
        first.release()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"error: --output_dir {out}: another run (pid {os.getpid()}) is writing --output_name t there "
                    "now; wait for it or use another --output_name")
    assert list(out.iterdir()) == []


def test_sampling_failure_is_one_warning_and_files_follow_the_umask(tiny_dataset, tmp_path, monkeypatch, caplog):
    from library.training import sampling

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --W 64 --H 64 --S 2\n", encoding="utf-8")

    def out_of_memory(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 40.00 GiB\nmore details")

    monkeypatch.setattr(sampling, "generate", out_of_memory)
    old = os.umask(0o022)
    try:
        argv = train_argv(tiny_dataset, tmp_path / "out", "--sample_prompts", str(prompts),
                          "--sample_every_n_steps", "1", steps=2)
        assert main(argv) == 0
    finally:
        os.umask(old)
    warnings = [r.getMessage() for r in caplog.records if "sampling at step" in r.getMessage()]
    assert warnings == [f"sampling at step {s} failed, training goes on: RuntimeError: CUDA out of memory. Tried to "
                        "allocate 40.00 GiB more details" for s in (1, 2)]
    lora = tmp_path / "out" / "t.safetensors"
    assert (lora.stat().st_mode & 0o777) == 0o644


def test_clip_skip_beyond_the_text_encoder_is_one_line(tiny_dataset, tmp_path, capsys):
    assert main(train_argv(tiny_dataset, tmp_path / "out", "--clip_skip", "50")) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: --clip_skip 50: the text encoder of builtin:tiny-sd has ") and "use 1 to" in line


def test_dangling_links_and_pipes_in_an_image_folder_are_named_in_one_warning(tiny_dataset, tmp_path, caplog):
    from library.cli import parse_args
    from library.training.setup import build_dataset

    images = tmp_path / "images"
    (images / "gone.png").symlink_to(tmp_path / "deleted.png")
    os.mkfifo(images / "pipe.png")
    build_dataset(parse_args(train_argv(tiny_dataset, tmp_path / "out")))
    lines = [r.getMessage() for r in caplog.records if "not files" in r.getMessage()]
    assert lines == [f"{images}: skipped 2 entries that are not files (dangling links or devices): gone.png, pipe.png"]


def test_captions_cut_at_the_token_limit_get_one_warning_per_dataset(tiny_dataset, tmp_path, caplog):
    from library.cli import parse_args
    from library.models.clip_tokenizer import load_clip_tokenizer
    from library.training.setup import build_dataset, warn_long_captions

    (tmp_path / "images" / "img00.txt").write_text("a red circle, " * 30, encoding="utf-8")  # 120 tokens
    (tmp_path / "images" / "img01.txt").write_text("green " * 76, encoding="utf-8")  # 76 tokens: one too many
    dataset = build_dataset(parse_args(train_argv(tiny_dataset, tmp_path / "out")))
    tokenizer = load_clip_tokenizer()
    warn_long_captions(dataset, tokenizer, "ds.toml")
    warn_long_captions(dataset, tokenizer, "ds.toml", max_token_length=150)  # room for both
    (tmp_path / "images" / "img01.txt").write_text("(green green:1.2) " * 38, encoding="utf-8")  # 76 once weighted
    warn_long_captions(build_dataset(parse_args(train_argv(tiny_dataset, tmp_path / "out"))), tokenizer, "w.toml",
                       weighted=True)
    lines = [r.getMessage() for r in caplog.records if "are cut there" in r.getMessage()]
    assert lines == ["ds.toml dataset 0: 2 of 8 captions are longer than 75 tokens and are cut there (longest: 120)",
                     "w.toml dataset 0: 2 of 8 captions are longer than 75 tokens and are cut there (longest: 120)"]


def test_a_save_that_fails_is_one_line_and_keeps_the_earlier_files(tiny_dataset, tmp_path, monkeypatch, capsys):
    from networks.lora import LoRANetwork

    real = LoRANetwork.save_weights
    calls = []

    def fail_the_second(self, file, dtype, metadata):
        calls.append(file)
        if len(calls) == 2:
            raise RuntimeError("serializer bug\nsecond line")
        return real(self, file, dtype, metadata)

    monkeypatch.setattr(LoRANetwork, "save_weights", fail_the_second)
    out = tmp_path / "out"
    assert main(train_argv(tiny_dataset, out, "--save_every_n_steps", "1", steps=2)) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == ("error: could not save t-step00000002: RuntimeError: serializer bug second line; the files saved "
                    "earlier are kept")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["t-step00000001.safetensors"]
    assert not [p for p in out.iterdir() if ".tmp" in p.name]

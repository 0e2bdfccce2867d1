"""sd-scripts' run options in a real (tiny) training run: trackers and their scalar names, wandb offline, the
console log, Hugging Face uploads (mocked Hub), persistent workers, optimizer switches and per-encoder lrs."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.cli import parse_args
from library.errors import ConfigError, OptimizerError
from library.training.entry import main
from library.training.trainer import LoRATrainer
from tests.training.conftest import train_argv


class FakeHub:
    """HfApi stand-in: records calls; uploads of intermediate saves fail as a network error would."""

    calls: list[tuple] = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, **kw):
        FakeHub.calls.append(("create_repo", kw["repo_id"], kw["private"]))

    def upload_file(self, *, path_or_fileobj, path_in_repo, **kw):
        if "step" in path_in_repo:
            raise ConnectionError("the Hub is unreachable")
        assert Path(path_or_fileobj).is_file()  # only a complete local file is uploaded
        FakeHub.calls.append(("upload_file", kw["repo_id"], path_in_repo))

    def upload_folder(self, *, folder_path, path_in_repo, **kw):
        FakeHub.calls.append(("upload_folder", kw["repo_id"], path_in_repo, sorted(p.name for p in
                                                                                Path(folder_path).iterdir())))


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


@pytest.mark.slow
def test_trackers_hub_and_schedule_in_a_run(tiny_dataset, tmp_path, monkeypatch, caplog):
    import huggingface_hub

    root = logging.getLogger()  # the console options replace the root's handlers: give them back afterwards
    monkeypatch.setattr(root, "handlers", root.handlers[:])
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    FakeHub.calls = []
    out, logs = tmp_path / "out", tmp_path / "logs"
    code = main(train_argv(
        tiny_dataset, out, "--log_with", "all", "--logging_dir", str(logs), "--log_tracker_name", "mylora", "--log_prefix", "pre-",
        "--wandb_run_name", "run-a", "--log_config", "--lr_scheduler", "linear", "--lr_warmup_steps", "0.5",
        "--unet_lr", "1e-3", "--text_encoder_lr", "5e-4", "--save_every_n_steps", "2", "--save_state",
        "--huggingface_repo_id", "me/lora", "--huggingface_path_in_repo", "runs", "--save_state_to_huggingface",
        "--console_log_file", str(tmp_path / "console.log"), "--console_log_simple", "--console_log_level", "INFO",
        steps=4))
    assert code == 0

    # TensorBoard: sd-scripts' names, the linear schedule with warm-up 0.5 x 4 = 2 steps
    runs = list(logs.glob("pre-2*"))  # <--logging_dir>/<--log_prefix><start time>, as sd-scripts
    assert len(runs) == 1 and len(runs[0].name) == len("pre-") + 14
    tb = scalars(runs[0] / "mylora")
    for tag in ("loss/current", "loss/average", "lr/unet", "lr/textencoder", "lr/group1", "loss/epoch_average"):
        assert tag in tb, sorted(tb)
    want = {s: (s / 2 if s < 2 else (4 - s) / 2) for s in range(1, 5)}  # the lr in force after step s
    assert [round(v / 1e-3, 6) for _, v in sorted(tb["lr/unet"])] == [round(want[s], 6) for s in range(1, 5)]
    assert [round(v / 5e-4, 6) for _, v in sorted(tb["lr/textencoder"])] == [round(want[s], 6) for s in range(1, 5)]
    losses = [v for _, v in sorted(tb["loss/current"])]
    averages = [v for _, v in sorted(tb["loss/average"])]
    assert averages[-1] == pytest.approx(sum(losses) / len(losses), rel=1e-5)  # one epoch: the plain mean

    # wandb offline: the run's files under --logging_dir, with the run name and the sanitised config
    runs = list(runs[0].glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    record = runs[0].read_bytes()  # protobuf records: their strings are stored as they are
    # name, project, scalars (the epoch's too, at wandb's own step), sd-scripts' step keys, --log_config's options
    for text in (b"run-a", b"mylora", b"lr/unet", b"loss/current", b"loss/epoch_average", b"global_step",
                 b"lr_scheduler_type"):
        assert text in record, text
    assert b"huggingface_token" not in record and b"wandb_api_key" not in record

    # the console log went to the file, in the simple format
    text = (tmp_path / "console.log").read_text()
    assert "training: 4 steps" in text and "INFO " not in text

    # Hub: the intermediate LoRA upload failed and the file is still here; the last one and its state uploaded
    assert (out / "t-step00000002.safetensors").is_file() and load_file(out / "t-step00000002.safetensors")
    assert "upload of" in text and "the local file is kept" in text
    assert ("create_repo", "me/lora", True) in FakeHub.calls
    assert ("upload_file", "me/lora", "runs/t.safetensors") in FakeHub.calls
    folder = [c for c in FakeHub.calls if c[0] == "upload_folder" and c[2] == "runs/t-state"]
    assert folder and "model.safetensors" in folder[-1][3] or "optimizer.bin" in folder[-1][3]


@pytest.mark.slow
def test_persistent_workers_serve_every_epoch_and_train_the_same(tiny_dataset, tmp_path):
    def run(name: str, *extra: str):
        argv = train_argv(tiny_dataset, tmp_path / name, "--flip_aug", "--caption_dropout_rate", "0.3",
                          "--max_data_loader_n_workers", "1", *extra, steps=5)  # 4 steps an epoch: 2 epochs
        trainer = LoRATrainer(parse_args(argv))
        trainer.setup()
        trainer.train()
        return trainer, load_file(tmp_path / name / "t.safetensors")

    kept, kept_weights = run("kept", "--persistent_data_loader_workers")
    assert kept.persistent_loader is not None and kept.persistent_loader._iterator is not None  # workers alive
    assert kept.progress.global_step == 5 and kept.epoch_batches.epoch == 1
    fresh, fresh_weights = run("fresh")
    assert fresh.persistent_loader is None
    for key, value in fresh_weights.items():  # each epoch's captions reached the kept workers
        torch.testing.assert_close(kept_weights[key], value, rtol=0, atol=0)


class EpochEcho(torch.utils.data.Dataset):
    """Returns (epoch the item was made in, index, worker pid, the optimizer step it was told)."""

    epoch = 0
    steps: dict = {}

    def set_epoch(self, epoch):
        self.epoch = epoch

    def set_sample_steps(self, steps, max_train_steps):
        self.steps = steps

    def __len__(self):
        return 4

    def __getitem__(self, i):
        import os

        return torch.tensor([self.epoch, i, os.getpid(), self.steps.get(i, -1)])


def test_kept_workers_follow_the_epoch():
    from library.training.multiprocess import EpochBatches, EpochIndexed

    batches = EpochBatches()
    loader = torch.utils.data.DataLoader(EpochIndexed(EpochEcho(), 10), batch_sampler=batches, num_workers=1,
                                         persistent_workers=True)
    seen = []
    for epoch in range(3):
        batches.set(epoch, [[0, 1], [3]], {0: 2 * epoch, 1: 2 * epoch, 3: 2 * epoch + 1} if epoch == 2 else None)
        seen.append(torch.cat(list(loader)))
    assert [s[:, 3].tolist() for s in seen] == [[-1, -1, -1]] * 2 + [[4, 4, 5]]  # token warm-up's steps
    assert [s[:, 0].tolist() for s in seen] == [[0, 0, 0], [1, 1, 1], [2, 2, 2]]
    assert [s[:, 1].tolist() for s in seen] == [[0, 1, 3]] * 3
    assert len({int(p) for s in seen for p in s[:, 2]}) == 1  # one worker process for all epochs


def test_persistent_workers_without_workers_is_said(caplog):
    from library.training.multiprocess import check_persistent_workers

    with caplog.at_level(logging.WARNING, logger="loraforge"):
        assert not check_persistent_workers(parse_args(["--persistent_data_loader_workers"]))
    assert "no workers to keep" in caplog.text


def test_optimizer_switches_and_dadaptation_names():
    from library.optimizers.registry import build_optimizer, resolve

    assert parse_args(["--use_8bit_adam"]).optimizer_type == "AdamW8bit"
    assert parse_args(["--use_lion_optimizer"]).optimizer_type == "Lion"
    for argv in (["--use_8bit_adam", "--use_lion_optimizer"], ["--use_lion_optimizer", "--optimizer_type", "AdamW"]):
        with pytest.raises(ConfigError, match="exclude each other"):
            parse_args(argv)
    param = [torch.nn.Parameter(torch.zeros(4, 4))]
    from dadaptation import DAdaptAdam
    from dadaptation.experimental import DAdaptAdamPreprint, DAdaptAdanIP

    assert type(build_optimizer("DAdaptation", param)[0]) is DAdaptAdamPreprint  # sd-scripts' meaning
    assert type(build_optimizer("DAdaptAdamPreprint", param)[0]) is DAdaptAdamPreprint
    assert type(build_optimizer("DAdaptAdanIP", param)[0]) is DAdaptAdanIP
    assert type(build_optimizer("DAdaptAdam", param)[0]) is DAdaptAdam
    assert resolve("dadapt_adan_ip").name == "DAdaptAdanIP"


@pytest.mark.parametrize("name", ["Prodigy", "DAdaptAdam"])
def test_fractional_value_for_an_integer_default(name):
    from library.optimizers.registry import build_optimizer

    optimizer, sources = build_optimizer(name, [torch.nn.Parameter(torch.zeros(2))],
                                         optimizer_args=["weight_decay=0.5"])
    assert optimizer.defaults["weight_decay"] == 0.5 and sources["weight_decay"] == "--optimizer_args"
    with pytest.raises(OptimizerError, match="expected a number"):
        build_optimizer(name, [torch.nn.Parameter(torch.zeros(2))], optimizer_args=["weight_decay='lots'"])


def test_text_encoder_lr_per_encoder_from_cli_and_toml(tmp_path):
    assert parse_args(["--text_encoder_lr", "1e-4", "2e-4"]).text_encoder_lr == [1e-4, 2e-4]
    cfg = tmp_path / "c.toml"
    cfg.write_text("text_encoder_lr = [1e-4, 3e-5]\nunet_lr = 1e-3\n", encoding="utf-8")
    assert parse_args(["--config_file", str(cfg)]).text_encoder_lr == [1e-4, 3e-5]
    cfg.write_text("text_encoder_lr = 1e-4\n", encoding="utf-8")
    assert parse_args(["--config_file", str(cfg)]).text_encoder_lr == [1e-4]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--deepspeed"], "--deepspeed needs"),
        (["--huggingface_path_in_repo", "x"], "needs --huggingface_repo_id"),
        (["--huggingface_repo_id", "a/b", "--huggingface_repo_visibility", "hidden"], "public or private"),
        (["--resume_from_huggingface", "--resume", "justaname"], "expected owner/repo/path_in_repo"),
        (["--log_tracker_config", "/nonexistent/trackers.toml"], "file not found"),
    ],
)
def test_run_options_refused_in_one_line_before_the_model(tiny_dataset, tmp_path, argv, needle, capsys):
    code = main(train_argv(tiny_dataset, tmp_path / "out", *argv, steps=1))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and needle in err[-1], err
    assert not (tmp_path / "out" / "t.safetensors").exists()


def test_deepspeed_options_without_deepspeed_are_said(caplog):
    from library.training.multiprocess import check_deepspeed

    with caplog.at_level(logging.WARNING, logger="loraforge"):
        check_deepspeed(parse_args(["--zero_stage", "3", "--offload_optimizer_device", "cpu"]))
    assert "--zero_stage, --offload_optimizer_device: DeepSpeed options, without effect" in caplog.text


def test_hub_resume_spec_and_download(monkeypatch, tmp_path):
    import huggingface_hub

    from library.training.hub import download_state, parse_hub_resume

    assert parse_hub_resume("me/repo/runs/t-state") == ("me/repo", "runs/t-state", None, None)
    assert parse_hub_resume("me/repo/runs/t-state:v1") == ("me/repo", "runs/t-state", "v1", "model")
    assert parse_hub_resume("me/repo/s:main:dataset") == ("me/repo", "s", "main", "dataset")

    def fake_snapshot(**kw):
        (tmp_path / "snap" / "runs" / "t-state").mkdir(parents=True, exist_ok=True)
        (tmp_path / "snap" / "runs" / "t-state" / "optimizer.bin").write_bytes(b"x")
        assert kw["allow_patterns"] == ["runs/t-state/*"] and kw["revision"] == "v1"
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    args = parse_args(["--resume", "me/repo/runs/t-state:v1", "--resume_from_huggingface"])
    assert download_state(args) == str(tmp_path / "snap" / "runs" / "t-state")


def test_tracker_config_file_and_sanitised_config(tmp_path):
    from library.training.trackers import sanitized_config, tracker_init_kwargs

    cfg = tmp_path / "trackers.toml"
    cfg.write_text("[wandb]\nentity = 'me'\ntags = ['lora']\n", encoding="utf-8")
    args = parse_args(["--log_tracker_config", str(cfg), "--wandb_run_name", "x", "--wandb_api_key", "secret",
                       "--output_dir", "/home/me/out"])
    assert tracker_init_kwargs(args) == {"wandb": {"entity": "me", "tags": ["lora"]}}  # replaces, as sd-scripts
    args.log_tracker_config = None
    assert tracker_init_kwargs(args) == {"wandb": {"name": "x"}}
    config = sanitized_config(args)
    assert "wandb_api_key" not in config and "output_dir" not in config and config["wandb_run_name"] == "x"
    assert all(v is None or isinstance(v, (bool, str, int, float)) for v in config.values())


def test_lr_names_as_sd_scripts():
    from library.training.trackers import lr_logs

    groups = [{"lr": 1e-4, "description": "textencoder"}, {"lr": 1e-3, "description": "unet"},
              {"lr": 4e-3, "description": "unet plus", "d": 2.0}]
    assert lr_logs(groups, unet_only=False) == {
        "lr/textencoder": 1e-4, "lr/unet": 1e-3, "lr/unet plus": 4e-3, "lr/d*lr/unet plus": 8e-3,
        "lr/group1": 1e-3, "lr/group2": 4e-3, "lr/d*lr/group2": 8e-3}
    assert lr_logs([{"lr": 1e-3}], unet_only=True) == {"lr/unet": 1e-3, "lr/group0": 1e-3}


def test_wandb_login_run_folder_and_run_name(tmp_path, monkeypatch):
    import wandb

    from library.training.trackers import start_trackers

    class FakeAccelerator:
        is_main_process = True
        project_dir = str(tmp_path / "logs" / "20260101000000")

        def init_trackers(self, name, config, init_kwargs):
            self.started = (name, config, init_kwargs)

    logins = []
    monkeypatch.setattr(wandb, "login", lambda key: logins.append(key))
    monkeypatch.setenv("WANDB_DIR", "unset")
    acc = FakeAccelerator()
    start_trackers(acc, parse_args(["--log_with", "wandb", "--wandb_api_key", "k123", "--logging_dir",
                                    str(tmp_path / "logs"), "--wandb_run_name", "night"]), {"optimizer": "AdamW"})
    import os

    assert logins == ["k123"] and os.environ["WANDB_DIR"] == acc.project_dir
    assert acc.started == ("network_train", {"optimizer": "AdamW"}, {"wandb": {"name": "night"}})

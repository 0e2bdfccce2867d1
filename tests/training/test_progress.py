"""The loss record and plot: the whole run across resumes, short runs included."""

from __future__ import annotations

import argparse
import csv

import torch

from library.training.entry import main
from library.training.progress import Progress
from tests.training.conftest import train_argv


class _NoTracker:
    is_main_process = True
    trackers: list = []


def _progress(out, initial: int) -> Progress:
    args = argparse.Namespace(output_name="t", plot_every_n_steps=None)
    return Progress(args, total=10, initial=initial, enabled=True, device=torch.device("cpu"),
                    accelerator=_NoTracker(), output_dir=out)


def _rows(path):
    with path.open(encoding="utf-8") as f:
        return [int(r[0]) for r in csv.reader(f)]


def test_a_resumed_run_keeps_the_logged_steps_up_to_its_resume_point(tmp_path):
    first = _progress(tmp_path, 0)
    for step in range(1, 6):
        first.log(step, 1.0 / step, {"lr/unet": 1e-4}, epoch=0, position=step)
    first.close()
    assert _rows(tmp_path / "t_loss.csv") == [1, 2, 3, 4, 5]
    resumed = _progress(tmp_path, 3)  # the state saved at step 3; steps 4-5 were lost with the stopped run
    assert [h[0] for h in resumed.history] == [1, 2, 3]
    resumed.log(4, 0.2, {"lr/unet": 1e-4}, epoch=0, position=4)
    resumed.close()
    assert _rows(tmp_path / "t_loss.csv") == [1, 2, 3, 4]
    assert (tmp_path / "t_loss.png").stat().st_size > 1000


def test_a_two_step_run_records_and_plots_both_steps(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    assert main(train_argv(tiny_dataset, out, steps=2)) == 0  # --log_every_n_steps 1
    assert _rows(out / "t_loss.csv") == [1, 2]
    assert (out / "t_loss.png").stat().st_size > 1000

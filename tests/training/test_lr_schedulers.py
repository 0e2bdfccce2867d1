"""Every sd-scripts --lr_scheduler, --lr_scheduler_type and the step options, against float64 closed forms of the
curves as sd-scripts defines them (get_scheduler_fix: transformers' / diffusers' schedules with its arguments)."""

from __future__ import annotations

import math

import pytest
import torch

from library.cli import parse_args
from library.errors import ConfigError
from library.training.lr_schedulers import build_lr_scheduler, check_lr_scheduler, scheduler_kwargs

LR = 1e-3
TOTAL = 40


def warm(s: int, w: int) -> float | None:
    return s / max(1, w) if s < w else None


def linear(s, w, t):
    return warm(s, w) if s < w else max(0.0, (t - s) / max(1, t - w))


def cosine(s, w, t):
    return warm(s, w) if s < w else max(0.0, 0.5 * (1 + math.cos(math.pi * (s - w) / max(1, t - w))))


def cosine_with_restarts(s, w, t, cycles):
    if s < w:
        return warm(s, w)
    p = (s - w) / max(1, t - w)
    return 0.0 if p >= 1 else max(0.0, 0.5 * (1 + math.cos(math.pi * ((cycles * p) % 1.0))))


def polynomial(s, w, t, power, lr_end=1e-7):
    if s < w:
        return warm(s, w)
    if s > t:
        return lr_end / LR
    return ((LR - lr_end) * (1 - (s - w) / (t - w)) ** power + lr_end) / LR


def inverse_sqrt(s, w, timescale):
    if s < w:
        return warm(s, w)
    timescale = timescale or (w or 10_000)
    return 1 / math.sqrt((s + timescale - w) / timescale)


def cosine_min(s, w, t, cycles, ratio):
    if s < w:
        return warm(s, w)
    p = (s - w) / max(1, t - w)
    return max(0.0, 0.5 * (1 + math.cos(math.pi * 2 * (cycles / 2) * p)) * (1 - ratio) + ratio)


def wsd(s, w, d, t, cycles, ratio):
    stable = t - w - d
    if s < w:
        return (s / max(1, w)) * (1 - ratio) + ratio
    if s < w + stable:
        return 1.0
    if s < w + stable + d:
        p = (s - w - stable) / max(1, d)
        return max(0.0, 0.5 * (1 + math.cos(math.pi * 2 * (cycles / 2) * p)) * (1 - ratio) + ratio)
    return ratio


def piecewise(s):
    return 1.0 if s < 10 else 0.1 if s < 20 else 0.01


def curve(argv: list[str], total: int = TOTAL) -> list[float]:
    args = parse_args(argv)
    check_lr_scheduler(args)
    param = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    optimizer = torch.optim.SGD([param], lr=LR)
    scheduler = build_lr_scheduler(args, optimizer, total)
    lrs = []
    for _ in range(total + 1):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


CASES = [
    (["--lr_scheduler", "constant"], lambda s: 1.0),
    (["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "7"], lambda s: s / 7 if s < 7 else 1.0),
    (["--lr_scheduler", "linear", "--lr_warmup_steps", "5"], lambda s: linear(s, 5, TOTAL)),
    (["--lr_scheduler", "cosine", "--lr_warmup_steps", "0.1"], lambda s: cosine(s, 4, TOTAL)),  # 10% of 40
    (["--lr_scheduler", "cosine_with_restarts", "--lr_warmup_steps", "25%", "--lr_scheduler_num_cycles", "3"],
     lambda s: cosine_with_restarts(s, 10, TOTAL, 3)),
    (["--lr_scheduler", "polynomial", "--lr_warmup_steps", "4", "--lr_scheduler_power", "2"],
     lambda s: polynomial(s, 4, TOTAL, 2.0)),
    (["--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "5"], lambda s: inverse_sqrt(s, 5, None)),
    (["--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "5", "--lr_scheduler_timescale", "20"],
     lambda s: inverse_sqrt(s, 5, 20)),
    (["--lr_scheduler", "cosine_with_min_lr", "--lr_warmup_steps", "4", "--lr_scheduler_min_lr_ratio", "0.1",
      "--lr_scheduler_num_cycles", "2"], lambda s: cosine_min(s, 4, TOTAL, 2, 0.1)),
    (["--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "4", "--lr_decay_steps", "0.25",
      "--lr_scheduler_min_lr_ratio", "0.05"], lambda s: wsd(s, 4, 10, TOTAL, 1, 0.05)),
    (["--lr_scheduler", "warmup_stable_decay", "--lr_decay_steps", "12"], lambda s: wsd(s, 0, 12, TOTAL, 1, 0.0)),
    (["--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules='1:10,0.1:20,0.01'"], piecewise),
    (["--lr_scheduler_type", "CosineAnnealingLR", "--lr_scheduler_args", "T_max=40", "eta_min=1e-4"],
     lambda s: (1e-4 + (LR - 1e-4) * (1 + math.cos(math.pi * s / 40)) / 2) / LR),
    (["--lr_scheduler_type", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler_args", "step_size=6", "gamma=0.5"],
     lambda s: 0.5 ** (s // 6)),
]


@pytest.mark.parametrize("argv, factor", CASES, ids=[" ".join(c[0][:2] + c[0][2:4]) for c in CASES])
def test_curve_matches_sd_scripts_formula(argv, factor):
    got = curve(argv)
    want = [LR * factor(s) for s in range(TOTAL + 1)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_adafactor_schedule_reports_adafactors_relative_step():
    from transformers.optimization import Adafactor

    args = parse_args(["--lr_scheduler", "adafactor:1e-3", "--optimizer_type", "Adafactor"])
    check_lr_scheduler(args)
    param = torch.nn.Parameter(torch.ones(4, 4))
    optimizer = Adafactor([param], lr=None, relative_step=True, scale_parameter=False, warmup_init=False)
    scheduler = build_lr_scheduler(args, optimizer, TOTAL)
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3)  # the given initial lr before the first step
    for step in range(1, 6):
        param.grad = torch.full_like(param, 0.1)
        optimizer.step()
        scheduler.step()
        assert scheduler.get_last_lr()[0] == pytest.approx(min(1e-2, 1 / math.sqrt(step)))


@pytest.mark.parametrize("text, expected", [("0.1", 0.1), ("10%", 0.1), ("1", 1), ("250", 250), ("0", 0.0)])
def test_warmup_steps_int_or_fraction(text, expected):
    value = parse_args(["--lr_warmup_steps", text, "--lr_decay_steps", text])
    assert value.lr_warmup_steps == pytest.approx(expected) and type(value.lr_warmup_steps) is type(expected)
    assert value.lr_decay_steps == value.lr_warmup_steps


def test_steps_above_one_must_be_whole(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--lr_warmup_steps", "1.5"])
    assert "steps are a whole number" in capsys.readouterr().err


def test_fraction_from_config_file(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("lr_scheduler = 'linear'\nlr_warmup_steps = 0.25\n", encoding="utf-8")
    assert curve(["--config_file", str(cfg)]) == pytest.approx([LR * linear(s, 10, TOTAL) for s in range(TOTAL + 1)])


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--lr_scheduler", "constant", "--lr_warmup_steps", "10"], "constant does not take --lr_warmup_steps"),
        (["--lr_scheduler", "cosine_annealing"], "choose one of"),
        (["--lr_scheduler_type", "NoSuchLR"], "has no scheduler 'NoSuchLR'"),
        (["--lr_scheduler_type", "nosuchpkg.Sched"], "cannot import nosuchpkg"),
        (["--lr_scheduler_type", "StepLR", "--lr_warmup_steps", "3"], "does not take --lr_warmup_steps"),
        (["--lr_scheduler", "piecewise_constant"], "step_rules"),
        (["--lr_scheduler", "cosine_with_min_lr"], "--lr_scheduler_min_lr_ratio"),
        (["--lr_scheduler", "warmup_stable_decay"], "--lr_decay_steps"),
        (["--lr_scheduler", "adafactor:fast"], "adafactor:INITIAL_LR"),
        (["--lr_scheduler", "linear", "--lr_scheduler_args", "oops"], "expected key=value"),
    ],
)
def test_refused_before_the_model_in_one_line(argv, needle):
    with pytest.raises(ConfigError) as err:
        check_lr_scheduler(parse_args(argv))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_adafactor_schedule_needs_adafactor():
    args = parse_args(["--lr_scheduler", "adafactor"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    with pytest.raises(ConfigError, match="use it with --optimizer_type Adafactor"):
        build_lr_scheduler(args, optimizer, TOTAL)


def test_scheduler_args_are_literals_never_code():
    args = parse_args(["--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=__import__('os')",
                       "gamma=0.5", "milestones=[1,2]"])
    assert scheduler_kwargs(args) == {"step_size": "__import__('os')", "gamma": 0.5, "milestones": [1, 2]}


def test_schedule_free_optimizers_keep_their_lr_as_sd_scripts():
    args = parse_args(["--optimizer_type", "AdamWScheduleFree", "--lr_scheduler", "cosine"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = build_lr_scheduler(args, optimizer, TOTAL)
    for _ in range(TOTAL):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == [LR]

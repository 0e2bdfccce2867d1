"""The registry: every name builds a working optimizer or says exactly why not; names, aliases, settings, logs."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest
import torch

from library.errors import ConfigError, OptimizerError, OptimizerUnavailable
from library.optimizers import registry
from library.optimizers.registry import (
    OptimizerSpec,
    build_optimizer,
    format_optimizer_table,
    list_optimizers,
    optimizer_family,
    resolve,
    unavailable_reason,
)

HF_NAMES = """adamw_torch adamw_torch_fused adamw_torch_xla adamw_torch_npu_fused adamw_apex_fused adamw_anyprecision
adamw_torch_4bit adamw_torch_8bit adamw_bnb_8bit adamw_8bit lion_32bit lion_8bit paged_adamw_32bit paged_adamw_8bit
paged_lion_32bit paged_lion_8bit ademamix ademamix_8bit paged_ademamix_32bit paged_ademamix_8bit galore_adamw
galore_adamw_8bit galore_adafactor galore_adamw_layerwise galore_adamw_8bit_layerwise galore_adafactor_layerwise
apollo_adamw apollo_adamw_layerwise sgd adagrad adafactor rmsprop rmsprop_bnb rmsprop_bnb_8bit rmsprop_bnb_32bit lomo
adalomo grokadamw stable_adamw schedule_free_radam schedule_free_adamw schedule_free_sgd""".split()
SD_SCRIPTS_NAMES = """AdamW AdamW8bit PagedAdamW PagedAdamW8bit PagedAdamW32bit Lion Lion8bit PagedLion8bit SGDNesterov
SGDNesterov8bit DAdaptation DAdaptAdamPreprint DAdaptAdam DAdaptAdaGrad DAdaptAdan DAdaptAdanIP DAdaptLion DAdaptSGD Prodigy AdaFactor CAME
RAdamScheduleFree AdamWScheduleFree SGDScheduleFree""".split()
OPENTOME_NAMES = """Lion SophiaG Lamb Adan Adam_mini AdamWSGG AdamWSGG_v2 AdafactorSGG LambSGG_v2 ShampooSGG_v2 AdamWSAC
Adam_miniSAC""".split()
IN_HOUSE_NAMES = (
    "CustomAdamW HinaAdamW custom_hina_adamw CustomAdamW8bit Automagic_Sinkgd Automagic_CameAMP".split()
)

STEP_BUDGET = 80  # D-Adaptation variants need ~60 steps before their step size has grown
# A fixed least-squares problem: y = W* x with a 64x64 weight (big enough for the 8-bit paths) and a bias.
_gen = torch.Generator().manual_seed(0)
X = torch.randn(32, 64, generator=_gen)
Y = X @ (torch.randn(64, 64, generator=_gen) / 8).T


def _problem(device: str) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 64, generator=gen) / 8
    return [torch.nn.Parameter(weight.to(device)), torch.nn.Parameter(torch.zeros(64, device=device))]


def _loss(params: list[torch.Tensor]) -> torch.Tensor:
    x, y = X.to(params[0].device), Y.to(params[0].device)
    return ((x @ params[0].T + params[1] - y) ** 2).sum(1).mean()


def _build(spec: OptimizerSpec, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    lr = 1.0 if spec.defaults.get("lr", 0.0) >= 0.5 else 1e-2  # step-size-learning optimizers want lr=1
    groups = [{"params": params, "names": ["lora_down.weight", "bias"]}]
    optimizer, _ = build_optimizer(spec.name, groups, lr=lr)
    if hasattr(optimizer, "train"):
        optimizer.train()  # schedule-free: the loop calls train() before stepping
    return optimizer


def _run(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int) -> float:
    for _ in range(steps):
        optimizer.zero_grad()
        _loss(params).backward()
        optimizer.step()
    return _loss(params).item()


@pytest.mark.parametrize("spec", list_optimizers(), ids=lambda s: s.name)
def test_every_optimizer_trains_and_resumes_exactly_or_says_why_not(spec: OptimizerSpec) -> None:
    reason = unavailable_reason(spec)
    if reason is not None and "not in this install" in reason:
        pytest.skip(f"in-house module missing: {reason}")
    if reason is not None:
        assert any(word in reason for word in (*spec.requires, "CUDA", "bypasses")), reason
        with pytest.raises(OptimizerUnavailable, match=re.escape(reason)):
            build_optimizer(spec.name, _problem("cpu"), lr=1e-3)
        return

    device = "cuda" if spec.needs_cuda else "cpu"
    torch.manual_seed(0)
    params = _problem(device)
    optimizer = _build(spec, params)
    start = _loss(params).item()
    assert _run(optimizer, params, STEP_BUDGET) < 0.75 * start

    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)  # the trainer's checkpoint goes through torch.save as well
    saved = [p.detach().clone() for p in params]
    _run(optimizer, params, 5)

    resumed = [torch.nn.Parameter(p.clone()) for p in saved]
    optimizer2 = _build(spec, resumed)
    buffer.seek(0)
    optimizer2.load_state_dict(torch.load(buffer, weights_only=False))
    buffer.seek(0)
    assert_bitwise_equal(optimizer2.state_dict(), torch.load(buffer, weights_only=False), "loaded state_dict")
    _run(optimizer2, resumed, 5)
    for a, b in zip(params, resumed, strict=True):
        assert torch.equal(a, b)
    assert_bitwise_equal(optimizer2.state_dict(), optimizer.state_dict(), "state_dict 5 steps after resume")


def assert_bitwise_equal(got, want, where: str) -> None:
    """Same structure, same dtypes, same bits (NaN == NaN); a resumed run must continue the exact state."""
    if isinstance(want, torch.Tensor):
        assert type(got) is type(want) and got.dtype == want.dtype and got.shape == want.shape, where
        if hasattr(want, "__tensor_flatten__"):  # torchao's quantised states: compare codes, scales and metadata
            names, meta = want.__tensor_flatten__()
            assert got.__tensor_flatten__() == (names, meta), where
            for name in names:
                assert_bitwise_equal(getattr(got, name), getattr(want, name), f"{where}.{name}")
        else:
            assert torch.equal(_bits(got), _bits(want)), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, set(got) ^ set(want))
        for key in want:
            assert_bitwise_equal(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_bitwise_equal(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and want != want:
        assert got != got, where
    elif hasattr(want, "__dict__") and not isinstance(want, type):  # GaLore/APOLLO keep projector objects
        assert type(got) is type(want), where
        assert_bitwise_equal(vars(got), vars(want), f"{where}.__dict__")
    else:
        assert got == want, (where, got, want)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().reshape(-1).view(torch.uint8) if t.dtype != torch.bool else t.reshape(-1)


@pytest.mark.parametrize("name", HF_NAMES + SD_SCRIPTS_NAMES + OPENTOME_NAMES + IN_HOUSE_NAMES)
def test_documented_names_resolve(name: str) -> None:
    assert resolve(name) in list_optimizers()


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("ADAMW-8BIT", "AdamW8bit"),
        ("adamw.bnb.8bit", "AdamW8bit"),
        ("adamw_8bit", "AdamW8bit"),
        ("custom-hina-adamw", "CustomAdamW"),
        ("HinaAdamW", "CustomAdamW"),
        ("adamw_sgg", "AdamWSGG"),
        ("DAdaptation", "DAdaptAdamPreprint"),
        ("PagedAdamW", "PagedAdamW32bit"),
        ("adaFactor", "adafactor"),
        ("schedule_free_adamw", "AdamWScheduleFree"),
        ("adam-mini", "Adam_mini"),
    ],
)
def test_names_ignore_case_and_separators(spelling: str, canonical: str) -> None:
    assert resolve(spelling) is resolve(canonical)


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(OptimizerError, match="AdamW8bit"):
        resolve("AdamW9bit")


def test_colliding_names_are_rejected() -> None:
    first, second = resolve("AdamW"), resolve("Lion")
    clash = OptimizerSpec("Lion2", ("adam-w",), second.build)
    with pytest.raises(RuntimeError, match="collides with AdamW"):
        registry._index([first, clash])


def test_module_path_loads_any_torch_optimizer() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    optimizer, sources = build_optimizer(
        "torch.optim.NAdam", [param], lr=0.5, optimizer_args=["momentum_decay=0.01"]
    )
    assert type(optimizer) is torch.optim.NAdam
    assert optimizer.defaults["momentum_decay"] == 0.01 and sources["momentum_decay"] == "--optimizer_args"
    assert optimizer_family(resolve("torch.optim.NAdam")) == "custom"


def test_module_path_errors_name_the_problem() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(OptimizerUnavailable, match="nosuchpackage"):
        build_optimizer("nosuchpackage.optim.Fancy", [param])
    with pytest.raises(OptimizerUnavailable, match="torch.optim has no NoSuchOpt"):
        build_optimizer("torch.optim.NoSuchOpt", [param])
    with pytest.raises(OptimizerError, match="not a torch.optim.Optimizer"):
        build_optimizer("collections.OrderedDict", [param])


def test_opentome_doc_defaults_apply_and_explicit_values_win() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    lion, sources = build_optimizer("Lion", [param])
    assert lion.defaults["lr"] == 2e-6 and lion.defaults["betas"] == (0.9, 0.98)
    assert sources == {"lr": "registry default", "betas": "registry default"}
    lion, sources = build_optimizer("lion", [param], lr=1e-4, optimizer_args=["betas=0.95,0.99"])
    assert lion.defaults["lr"] == 1e-4 and lion.defaults["betas"] == (0.95, 0.99)
    assert sources == {"lr": "CLI flag", "betas": "--optimizer_args"}
    adan, _ = build_optimizer("Adan", [param], lr=1e-3)
    assert adan.defaults["betas"] == (0.9, 0.92, 0.99)
    lamb, _ = build_optimizer("Lamb", [param], lr=1e-3)
    assert lamb.defaults["betas"] == (0.9, 0.99)
    sophia, _ = build_optimizer("SophiaG", [param])
    assert sophia.defaults["lr"] == 2e-6 and sophia.hessian_update_interval == 10


def test_group_lr_and_names_reach_the_optimizer() -> None:
    a, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    groups = [{"params": [a], "names": ["a"], "lr": 0.5}, {"params": [b], "names": ["b"]}]
    optimizer, _ = build_optimizer("AdamW", groups, lr=0.1)
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.1]
    assert [g["names"] for g in optimizer.param_groups] == [["a"], ["b"]]


def test_galore_projects_only_matrices_and_keeps_names_parallel() -> None:
    matrix, vector = torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(3))
    groups = [{"params": [vector, matrix], "names": ["v", "m"]}]
    optimizer, sources = build_optimizer("galore_adamw", groups, lr=1e-3, optimizer_args=["rank=2"])
    projected, plain = optimizer.param_groups
    assert projected["params"] == [matrix] and projected["names"] == ["m"] and projected["rank"] == 2
    assert plain["params"] == [vector] and plain["names"] == ["v"] and "rank" not in plain
    assert sources["rank"] == "--optimizer_args"


def test_adafactor_uses_fixed_lr_unless_relative_step() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    fixed, _ = build_optimizer("AdaFactor", [param], lr=1e-3)
    assert fixed.defaults["lr"] == 1e-3 and fixed.defaults["relative_step"] is False
    relative, _ = build_optimizer("adafactor", [param], lr=1e-3, optimizer_args=["relative_step=True"])
    assert relative.defaults["lr"] is None and relative.defaults["relative_step"] is True


def test_name_implied_settings_cannot_be_overridden() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    optimizer, _ = build_optimizer("adamw_torch_fused", [param])
    assert optimizer.defaults["fused"] is True
    with pytest.raises(OptimizerError, match="does not accept 'fused'"):
        build_optimizer("adamw_torch_fused", [param], optimizer_args=["fused=False"])


def test_invalid_values_from_the_class_become_optimizer_errors() -> None:
    with pytest.raises(OptimizerError, match="AdamW: invalid settings.*lr"):
        build_optimizer("AdamW", [torch.nn.Parameter(torch.ones(3))], lr=-1.0)


def test_unknown_setting_lists_the_accepted_ones() -> None:
    with pytest.raises(
        OptimizerError, match=r"AdamW does not accept 'wieght_decay' \(did you mean 'weight_decay'\?\)"
    ):
        build_optimizer("AdamW", [torch.nn.Parameter(torch.ones(3))], toml_table={"wieght_decay": 0.1})


def test_env_vars_reach_the_optimizers_that_take_them() -> None:
    param = torch.nn.Parameter(torch.ones(4, 4))
    environ = {"SAC_SCALE_UPDATE_FREQ": "7", "SAC_SCALE_BOUND": "(0.25, 4.0)", "ADAM_MINI_N_HEADS": "2"}
    sac, sources = build_optimizer(
        "AdamWSAC", [{"params": [param], "names": ["w"]}], lr=1e-3, environ=environ
    )
    assert sources["scale_update_freq"] == "env SAC_SCALE_UPDATE_FREQ"
    assert sources["scale_bound"] == "env SAC_SCALE_BOUND"
    assert "n_heads" not in sources  # ADAM_MINI_* belongs to Adam_mini, not to SAC
    mini, sources = build_optimizer("Adam_mini", [param], lr=1e-3, environ=environ)
    assert sources["n_heads"] == "env ADAM_MINI_N_HEADS"
    adamw, sources = build_optimizer("AdamW", [param], lr=1e-3, environ=environ)
    assert sources == {"lr": "CLI flag"}


def test_sgg_env_vars_only_for_classes_that_take_them() -> None:
    param = torch.nn.Parameter(torch.ones(4, 4))
    environ = {"SGG_N_CLUSTERS": "2", "SGG_T_TOTAL": "500"}
    _, sources = build_optimizer(
        "LambSGG_v2", [{"params": [param], "names": ["w"]}], lr=1e-3, environ=environ
    )
    assert sources["n_clusters"] == "env SGG_N_CLUSTERS" and sources["t_total"] == "env SGG_T_TOTAL"
    _, sources = build_optimizer("AdamWSGG", [{"params": [param], "names": ["w"]}], lr=1e-3, environ=environ)
    assert sources["n_clusters"] == "env SGG_N_CLUSTERS" and "t_total" not in sources
    with pytest.raises(ConfigError, match="SGG_N_CLUSTERS='two'"):
        build_optimizer("AdamWSGG", [param], lr=1e-3, environ={"SGG_N_CLUSTERS": "two"})


def test_logs_selected_optimizer_type_and_sources(caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    monkeypatch.setattr(registry, "_loaded_logged", False)
    param = torch.nn.Parameter(torch.ones(4, 4))
    logging.disable(logging.INFO)  # the trainer's silent settings probe must not use up the "loaded" lines
    try:
        build_optimizer("AdamW", [param])
    finally:
        logging.disable(logging.NOTSET)
    with caplog.at_level(logging.INFO, logger="library.optimizers.registry"):
        build_optimizer(
            "AdamWSAC", [{"params": [param], "names": ["w"]}], optimizer_args=["weight_decay=0.0"]
        )
        build_optimizer("AdamW", [param])
    text = caplog.text
    assert "Selected optimizer: AdamWSAC (Type: SAC (scaling with architectural constraints))" in text
    assert "Selected optimizer: AdamW (Type: standard)" in text
    assert "weight_decay = 0.0 (--optimizer_args)" in text
    assert "betas = (0.9, 0.99) (registry default)" in text
    for label in ("SGG", "SAC"):
        assert text.count(f"{label} optimizers loaded: [") == 1
    others = sum(unavailable_reason(s) is None for s in list_optimizers() if s.family not in ("SGG", "SAC"))
    assert text.count(f"{others} other optimizers available (--optimizer_type list names them)") == 1
    assert "'AdamWSAC'" in text.split("SAC optimizers loaded:")[1].splitlines()[0]


def test_family_types_name_the_methods_as_the_modules_do() -> None:
    assert optimizer_family(resolve("AdamWSGG")) == "SGG (scaling with gradient grouping)"
    assert optimizer_family(resolve("Adam_miniSAC")) == "SAC (scaling with architectural constraints)"
    assert optimizer_family(resolve("Lamb")) == "standard"
    assert optimizer_family(resolve("HinaAdamW")) == "Hina"


def test_listing_shows_every_name_with_its_status_within_the_width() -> None:
    table = format_optimizer_table(width=140)
    lines = table.splitlines()
    for spec in list_optimizers():
        row = next(line for line in lines if line.split()[0] == spec.name)
        assert ("available" in row) == (unavailable_reason(spec) is None)
        assert all(alias in row for alias in spec.aliases)
    assert all(len(line) <= 140 for line in lines)
    assert re.search(r"^lomo\s.*refused", table, re.MULTILINE)
    assert re.search(r"^adamw_torch_xla\s.*needs torch_xla", table, re.MULTILINE)


def test_piped_listing_keeps_every_description_whole(monkeypatch) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    table = format_optimizer_table()
    for spec in list_optimizers():
        assert spec.description in table


def test_did_you_mean_names_each_optimizer_once() -> None:
    with pytest.raises(OptimizerError, match="did you mean") as raised:
        resolve("AdamW8bitt")
    names = str(raised.value).split("did you mean ", 1)[1].rstrip("?").split(", ")
    assert len(names) == len(set(names)) and "AdamW8bit" in names

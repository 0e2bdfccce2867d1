"""Optimizer settings: parsing of --optimizer_args / env vars, type checks, precedence and sources."""

from __future__ import annotations

import pytest

from library.errors import ConfigError, OptimizerError
from library.optimizers.args import EMPTY, parse_env_value, parse_optimizer_args, resolve_settings

ACCEPTED = {
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "weight_decay": 0.0,
    "n_clusters": 3,
    "flag": False,
    "proj": "std",
    "scale_bound": (1.0, 10.0),
    "maybe": None,
    "required": EMPTY,
}


def test_optimizer_args_are_python_literals_or_bare_words() -> None:
    parsed = parse_optimizer_args(
        [
            "weight_decay=0.01",
            "betas=0.9,0.99",
            "flag=True",
            "d0=None",
            "proj_type=std",
            "name='a=b'",
            "eps=(1e-30, 1e-3)",
            "ids=[1, 2]",
            " n = 5 ",
        ]
    )
    assert parsed == {
        "weight_decay": 0.01,
        "betas": (0.9, 0.99),
        "flag": True,
        "d0": None,
        "proj_type": "std",
        "name": "a=b",
        "eps": (1e-30, 1e-3),
        "ids": (1, 2),
        "n": 5,
    }


@pytest.mark.parametrize(
    "item", ["betas=(0.9,", "noequals", "=3", "1x=3", "lr=", "lr=1e-3x", "x=__import__('os')"]
)
def test_bad_optimizer_args_name_the_item(item: str) -> None:
    with pytest.raises(OptimizerError, match="--optimizer_args") as info:
        parse_optimizer_args([item])
    assert repr(item.strip()) in str(info.value) or item in str(info.value)


@pytest.mark.parametrize(
    ("raw", "default", "value"),
    [
        ("5", 3, 5),
        ("3e-4", 1.0, 3e-4),
        ("7", 1.0, 7.0),
        ("True", False, True),
        ("true", False, True),
        ("1", False, True),
        ("false", True, False),
        ("0", True, False),
        ("(1, 10.0)", (0.5, 2.0), (1, 10.0)),
        ("[0.1, 2]", (0.5, 2.0), (0.1, 2)),
        ("std", "svd", "std"),
        ("4096", None, 4096),
        ("(1, 2)", None, (1, 2)),
        ("word", None, "word"),
    ],
)
def test_env_values_are_typed_by_the_default(raw: str, default: object, value: object) -> None:
    result = parse_env_value("SGG_X", raw, default)
    assert result == value and type(result) is type(value)


@pytest.mark.parametrize(
    ("raw", "default", "expected"),
    [
        ("five", 3, "a number"),
        ("abc", 1.0, "a number"),
        ("yes", False, "True/true/1 or False/false/0"),
        ("10", (1.0, 2.0), "a tuple of numbers"),
        ("(1, 'a')", (1.0, 2.0), "a tuple of numbers"),
        ("__import__('os').getcwd()", (1.0, 2.0), "a tuple"),
    ],
)
def test_bad_env_values_name_variable_value_and_form(raw: str, default: object, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_env_value("SGG_N_CLUSTERS", raw, default)
    message = str(info.value)
    assert "SGG_N_CLUSTERS" in message and repr(raw) in message and expected in message


def test_env_values_are_never_evaluated() -> None:
    code = "__import__('os').system('false')"
    assert parse_env_value("SAC_DIM", code, None) == code


def _resolve(**sources):
    return resolve_settings("Opt", ACCEPTED, **sources)


def test_precedence_cli_over_args_over_toml_over_env_over_default() -> None:
    every = dict(
        spec_defaults={"weight_decay": 0.5},
        env_vars={"weight_decay": "OPT_WD"},
        environ={"OPT_WD": "0.4"},
        toml_table={"weight_decay": 0.3},
        optimizer_args=["weight_decay=0.2"],
        cli_kwargs={"weight_decay": 0.1},
    )
    expected = [
        (0.1, "CLI flag"),
        (0.2, "--optimizer_args"),
        (0.3, "[optimizer] TOML"),
        (0.4, "env OPT_WD"),
        (0.5, "registry default"),
    ]
    for drop, (value, source) in zip(
        ["", "cli_kwargs", "optimizer_args", "toml_table", "environ"], expected, strict=True
    ):
        every.pop(drop, None)
        kwargs, sources = _resolve(**every)
        assert kwargs["weight_decay"] == value and sources["weight_decay"] == source
    every.pop("spec_defaults")
    kwargs, sources = _resolve(**every)
    assert "weight_decay" not in kwargs and "weight_decay" not in sources


def test_lr_from_explicit_flag_then_args_then_class_default() -> None:
    assert _resolve(lr=0.5, optimizer_args=["lr=0.1"])[0]["lr"] == 0.5
    kwargs, sources = _resolve(optimizer_args=["lr=0.1"])
    assert kwargs["lr"] == 0.1 and sources == {"lr": "--optimizer_args"}
    kwargs, sources = _resolve()
    assert kwargs == {"lr": 1e-3} and sources == {}


def test_none_cli_values_mean_not_given() -> None:
    kwargs, sources = _resolve(cli_kwargs={"flag": None, "n_clusters": 4}, toml_table={"flag": True})
    assert kwargs["flag"] is True and sources["flag"] == "[optimizer] TOML"
    assert kwargs["n_clusters"] == 4 and sources["n_clusters"] == "CLI flag"


def test_env_vars_only_for_accepted_kwargs() -> None:
    kwargs, sources = _resolve(
        env_vars={"n_clusters": "SGG_N_CLUSTERS", "t_total": "SGG_T_TOTAL"},
        environ={"SGG_N_CLUSTERS": "5", "SGG_T_TOTAL": "not read"},
    )
    assert kwargs["n_clusters"] == 5 and "t_total" not in kwargs
    assert sources == {"n_clusters": "env SGG_N_CLUSTERS"}


def test_env_typed_by_registry_default_when_the_class_has_none() -> None:
    kwargs, _ = _resolve(spec_defaults={"maybe": 2.0}, env_vars={"maybe": "M"}, environ={"M": "3"})
    assert kwargs["maybe"] == 3.0 and isinstance(kwargs["maybe"], float)


def test_toml_arrays_become_tuples_and_selector_key_is_ignored() -> None:
    kwargs, sources = _resolve(toml_table={"name": "AdamWSGG", "betas": [0.9, 0.95], "scale_bound": [1, 5.0]})
    assert kwargs["betas"] == (0.9, 0.95) and kwargs["scale_bound"] == (1, 5.0)
    assert "name" not in kwargs and sources["betas"] == "[optimizer] TOML"


@pytest.mark.parametrize(
    ("source", "key", "value", "message"),
    [
        (
            "toml_table",
            "weight_decay",
            "abc",
            r"\[optimizer\] TOML: weight_decay='abc' is not valid for Opt: expected a number",
        ),
        ("toml_table", "n_clusters", "x", "n_clusters='x' is not valid for Opt: expected a number"),
        (
            "optimizer_args",
            "flag",
            3,
            "--optimizer_args: flag=3 is not valid for Opt: expected True or False",
        ),
        ("optimizer_args", "betas", 0.9, r"expected a tuple like \(0.9, 0.999\)"),
        ("cli_kwargs", "proj", 1, "CLI flag: proj=1 is not valid for Opt: expected a string"),
    ],
)
def test_wrong_types_name_source_key_value_and_expectation(source, key, value, message) -> None:
    given = [f"{key}={value!r}"] if source == "optimizer_args" else {key: value}
    with pytest.raises(OptimizerError, match=message):
        _resolve(**{source: given})


def test_compatible_types_are_converted() -> None:
    kwargs, _ = _resolve(toml_table={"n_clusters": 4.0, "weight_decay": 1}, optimizer_args=["flag=true"])
    assert kwargs["n_clusters"] == 4 and type(kwargs["n_clusters"]) is int
    assert kwargs["weight_decay"] == 1.0 and type(kwargs["weight_decay"]) is float
    assert kwargs["flag"] is True


@pytest.mark.parametrize("source", ["toml_table", "optimizer_args", "cli_kwargs"])
def test_unknown_kwargs_list_the_accepted_ones(source: str) -> None:
    given = ["n_cluster=3"] if source == "optimizer_args" else {"n_cluster": 3}
    with pytest.raises(OptimizerError) as info:
        _resolve(**{source: given})
    message = str(info.value)
    assert "Opt does not accept 'n_cluster'" in message and "did you mean 'n_clusters'" in message
    assert (
        "accepted: betas, flag, lr, maybe, n_clusters, proj, required, scale_bound, weight_decay" in message
    )


def test_earlier_setting_names_still_work_from_every_source() -> None:
    from library.optimizers.registry import build_optimizer

    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt, sources = build_optimizer("Automagic_Sinkgd", [p], lr=1e-3, cli_kwargs={"alora_eta": 3.0},
                                   optimizer_args=["orthograd=True", "cuda_graph=False"], toml_table={"eta": 5.0})
    assert opt.defaults["use_orthogonal_grad"] is True and opt.defaults["cuda_graphs"] is False
    assert opt.defaults["alora_eta"] == 3.0 and sources["alora_eta"] == "CLI flag"
    assert sources["use_orthogonal_grad"] == "--optimizer_args"
    with pytest.raises(OptimizerError, match="orthograd and use_orthogonal_grad are one setting"):
        build_optimizer("Automagic_Sinkgd", [p], optimizer_args=["orthograd=True", "use_orthogonal_grad=False"])


def test_an_optimizer_that_accepts_an_earlier_name_itself_keeps_it() -> None:
    kwargs, _ = resolve_settings("X", {"lr": 1e-3, "eta": 0.5}, optimizer_args=["eta=0.7"])
    assert kwargs["eta"] == 0.7


def test_earlier_flag_spellings_parse_to_the_current_settings(tmp_path) -> None:
    from library.cli import parse_args

    args = parse_args(["--orthograd", "--eta", "4"])
    assert args.use_orthogonal_grad is True and args.alora_eta == 4.0
    assert parse_args(["--no-orthograd"]).use_orthogonal_grad is False
    config = tmp_path / "run.toml"
    config.write_text("orthograd = true\neta = 3.0\n", encoding="utf-8")
    args = parse_args(["--config_file", str(config)])
    assert args.use_orthogonal_grad is True and args.alora_eta == 3.0
    assert set(args.config_file_keys) >= {"use_orthogonal_grad", "alora_eta"}

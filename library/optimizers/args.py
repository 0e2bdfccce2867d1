"""Optimizer settings from every source, merged with one precedence and a record of where each came from.

Sources, strongest first: explicit CLI flag > ``--optimizer_args k=v`` > ``[optimizer]`` TOML table >
environment variable (``SGG_*``, ``SAC_*``, ``ADAM_MINI_*``) > the registry's documented default > the
optimizer class's own default. Values are checked against the type of the default (any number for a numeric
default: Prodigy's integer ``weight_decay=0`` takes 0.5, as in sd-scripts) so that a typo fails at start-up with a message naming the flag, key or variable instead of deep inside the first step.
User strings are parsed with ``ast.literal_eval`` only, never evaluated.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import math
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from library.errors import ConfigError, OptimizerError

EMPTY = inspect.Parameter.empty

SOURCE_CLI = "CLI flag"
SOURCE_CONFIG_FILE = "--config_file"
SOURCE_ARGS = "--optimizer_args"
SOURCE_TOML = "[optimizer] TOML"
SOURCE_DEFAULT = "registry default"

# A bare word such as `proj_type=std` is taken as a string; anything else must be a Python literal.
_BARE_STRING = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/:]*")
_TRUE = {"True", "true", "1"}
_FALSE = {"False", "false", "0"}
# Keys of the [optimizer] table that select the optimizer rather than configure it.
TOML_SELECTOR_KEYS = ("name",)
# Earlier spellings of in-house settings, still accepted everywhere a setting is (documented in docs/optimizers.md):
# one name per setting across optimizers, without breaking users' commands.
SETTING_ALIASES = {"orthograd": "use_orthogonal_grad", "eta": "alora_eta", "cuda_graph": "cuda_graphs"}


def parse_optimizer_args(args: Sequence[str] | None) -> dict[str, Any]:
    """Parse ``--optimizer_args`` items ``key=value``; ``betas=0.9,0.99`` gives a tuple, ``proj_type=std`` a str."""
    parsed: dict[str, Any] = {}
    for item in args or ():
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key.isidentifier() or not text:
            raise OptimizerError(
                f"--optimizer_args: {item!r} is not of the form key=value (e.g. weight_decay=0.01 betas=0.9,0.99)"
            )
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            if not _BARE_STRING.fullmatch(text):
                raise OptimizerError(
                    f"--optimizer_args: cannot parse the value of {item!r}: expected a Python literal "
                    "(number, True/False/None, tuple like 0.9,0.99, quoted string) or a bare word"
                ) from None
            value = text
        parsed[key] = _tuples(value)
    return parsed


def parse_env_value(var: str, raw: str, default: Any) -> Any:
    """Type an environment variable by the type of the setting's default (bool, int, float, tuple, str)."""
    text = raw.strip()
    if isinstance(default, bool):
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(
            f"environment variable {var}={raw!r} is not valid: expected True/true/1 or False/false/0"
        )
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)  # an integer default does not make the setting integer-only
        except ValueError:
            raise ConfigError(
                f"environment variable {var}={raw!r} is not valid: expected a number, e.g. {var}={default}"
            ) from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(
                f"environment variable {var}={raw!r} is not valid: expected a number, e.g. {var}={default}"
            ) from None
    if isinstance(default, tuple | list):
        value = _literal(text)
        if not isinstance(value, tuple | list) or not all(_is_number(v) for v in value):
            raise ConfigError(
                f"environment variable {var}={raw!r} is not valid: expected a tuple of numbers, "
                f'e.g. {var}="{tuple(default)}"'
            )
        return tuple(value)
    if isinstance(default, str):
        return raw
    value = _literal(text)  # no typed default: accept a literal, else keep the text
    return raw if value is _NOT_LITERAL else _tuples(value)


def accepted_kwargs(target: Any, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments a class/builder accepts, name -> default (``EMPTY`` when required).

    The first parameter (the parameters or model) and ``*args``/``**kwargs`` are left out: several libraries
    swallow unknown keywords in ``**kwargs``, which would turn a typo into a silently ignored setting.
    """
    sig = inspect.signature(target)
    params = list(sig.parameters.values())
    if params and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        params = params[1:]
    out = {
        p.name: p.default
        for p in params
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"
    }
    out.update(extra or {})
    return out


def coerce_value(optimizer: str, key: str, value: Any, default: Any, where: str) -> Any:
    """Check ``value`` against the type of ``default``; ints pass for floats, lists become tuples."""
    value = _tuples(value)
    if value is None or default is EMPTY or default is None:
        return value
    expected = None
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value in _TRUE | _FALSE:
            return value in _TRUE
        expected = "True or False"
    elif isinstance(default, int):
        # a default of 0 says nothing about the kind (Prodigy's weight_decay=0): a fraction passes as given,
        # as sd-scripts passes every literal through
        if _is_number(value):
            return int(value) if float(value).is_integer() else float(value)
        expected = "a number"
    elif isinstance(default, float):
        if _is_number(value):
            return float(value)
        expected = "a number"
    elif isinstance(default, tuple | list):
        if isinstance(value, tuple):
            return value
        expected = f"a tuple like {tuple(default)}"
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        expected = "a string"
    if expected is None:
        return value
    raise OptimizerError(
        f"{where}: {key}={value!r} is not valid for {optimizer}: expected {expected} (default {default!r})"
    )


def resolve_settings(
    optimizer: str,
    accepted: Mapping[str, Any],
    *,
    spec_defaults: Mapping[str, Any] | None = None,
    env_vars: Mapping[str, str] | None = None,
    lr: float | None = None,
    cli_kwargs: Mapping[str, Any] | None = None,
    optimizer_args: Sequence[str] | Mapping[str, Any] | None = None,
    toml_table: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    from_config_file: Collection[str] = (),
) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge the sources into constructor kwargs; returns (kwargs, {kwarg: source}) for every value set.

    ``accepted`` maps each accepted kwarg (``lr`` included) to its class default. ``lr`` is the explicit
    ``--learning_rate`` (None when not given); ``cli_kwargs`` holds the other explicit CLI flags (None values
    are ignored so argparse namespaces can be passed through). ``env_vars`` maps kwarg -> variable name; only
    variables whose kwarg the optimizer accepts are read. The returned kwargs always contain ``lr``.
    ``from_config_file`` names the CLI values that came from ``--config_file`` (``lr`` for ``learning_rate``):
    they rank as CLI flags, and are labelled as coming from the file.
    """
    if isinstance(optimizer_args, Mapping):
        args_values = dict(optimizer_args)
    else:
        args_values = parse_optimizer_args(optimizer_args)
    toml_values = {k: v for k, v in (toml_table or {}).items() if k not in TOML_SELECTOR_KEYS}
    cli_values = {k: v for k, v in (cli_kwargs or {}).items() if v is not None}
    if lr is not None:
        cli_values["lr"] = lr
    names = dict(accepted)
    names.setdefault("lr", None)
    cli_values, args_values, toml_values = (
        _canonical_keys(values, names) for values in (cli_values, args_values, toml_values)
    )

    for where, values in ((SOURCE_CLI, cli_values), (SOURCE_ARGS, args_values), (SOURCE_TOML, toml_values)):
        for key in values:
            if key not in names:
                raise OptimizerError(_unknown_message(optimizer, key, where, names))

    kwargs: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, default in (spec_defaults or {}).items():
        if key in names:
            kwargs[key], sources[key] = default, SOURCE_DEFAULT
    for key, var in (env_vars or {}).items():
        raw = (environ or {}).get(var)
        if key in names and raw is not None:
            default = kwargs.get(key, names[key])
            kwargs[key], sources[key] = (
                parse_env_value(var, raw, None if default is EMPTY else default),
                f"env {var}",
            )
    for where, values in ((SOURCE_TOML, toml_values), (SOURCE_ARGS, args_values), (SOURCE_CLI, cli_values)):
        for key, value in values.items():
            default = kwargs.get(key, names[key]) if names[key] is EMPTY or names[key] is None else names[key]
            label = SOURCE_CONFIG_FILE if where == SOURCE_CLI and key in from_config_file else where
            kwargs[key], sources[key] = coerce_value(optimizer, key, value, default, label), label
    kwargs.setdefault("lr", None if names["lr"] is EMPTY else names["lr"])
    for key, source in sources.items():
        if source != SOURCE_DEFAULT and not _all_finite(kwargs[key]):
            raise OptimizerError(f"{source}: {key}={kwargs[key]!r} is not valid for {optimizer}: "
                                 "numbers must be finite (no inf/nan)")
    return kwargs, sources


def _all_finite(value: Any) -> bool:
    """Numbers (and tuples of them) a user set must be finite: inf or nan makes every step NaN."""
    if isinstance(value, tuple | list):
        return all(_all_finite(v) for v in value)
    return not (_is_number(value) and not isinstance(value, bool) and not math.isfinite(value))


def _canonical_keys(values: dict[str, Any], names: Mapping[str, Any]) -> dict[str, Any]:
    """Settings under their current names: an earlier spelling becomes the name the optimizer accepts (only when
    it does not accept the earlier one itself, as a third-party optimizer with its own ``eta`` may)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        target = SETTING_ALIASES.get(key)
        if target is not None and key not in names and target in names:
            if target in values:
                raise OptimizerError(f"{key} and {target} are one setting ({key} is its earlier name); give one")
            key = target
        out[key] = value
    return out


def _unknown_message(optimizer: str, key: str, where: str, names: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(names), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{where}: {optimizer} does not accept {key!r}{hint}; accepted: {', '.join(sorted(names))}"


_NOT_LITERAL = object()


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return _NOT_LITERAL


def _tuples(value: Any) -> Any:
    """TOML arrays and literal lists become tuples (betas etc. are tuples in every optimizer)."""
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)

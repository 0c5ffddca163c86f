"""Flower's run config as a view of :class:`~flora.config.RunConfig`: one source of truth for keys, types
and defaults.

Every RunConfig field is a key of ``[tool.flwr.app.config]`` under its own name, with its default (lists as
comma-separated strings: Flower's run-config values are scalars), so ``flwr run . --run-config "lr=0.001
ranks='16,8,4,4' method='fedit'"`` takes every key the TOML file and ``--set`` take, converted and validated
by the same :meth:`RunConfig.from_dict`. Two keys belong to the Flower app only: ``config-file`` (a FLoRA
TOML file read first; the keys given with ``--run-config`` override it), ``resume``, and ``simulation``
(``flwr run`` against a local simulation SuperLink: the server deals the data out as shards, as ``flora run``
does; without it the SuperNodes bring their own data). No flwr import here.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib

from flora.config import ConfigError, RunConfig, load_config

APP_KEYS = {"config-file": "", "resume": False, "simulation": False}  # Flower-app keys that are not RunConfig fields


def flower_value(value):
    """A RunConfig value as a Flower run-config scalar (lists: comma-separated strings)."""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value


def app_config_table() -> dict:
    """``[tool.flwr.app.config]``: every RunConfig field at its default, then the app's own keys."""
    return {**defaults(), **APP_KEYS}


def defaults() -> dict:
    """Every RunConfig field's default as a Flower scalar, in field order."""
    table = {}
    for f in dataclasses.fields(RunConfig):
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        table[f.name] = flower_value(value)
    return table


def toml_literal(key: str, value) -> str:
    """``value`` as Flower's ``--run-config`` parser reads it back exactly (TOML scalars; strings quoted so that
    spaces survive Flower's ``key=value`` splitting)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return {math.inf: "inf", -math.inf: "-inf"}.get(value, "nan")
        return repr(value)
    text = str(value)
    if "\n" in text or ("'" in text and '"' in text):
        raise ConfigError(f"{key} = {text!r}: a Flower run-config string holds no line breaks and not both quote kinds")
    if "'" not in text:
        return f"'{text}'"
    return '"' + text.replace("\\", "\\\\") + '"'


def run_config_overrides(config: RunConfig) -> str:
    """The ``--run-config`` string that gives ``config`` exactly: every field, by name."""
    values = {key: flower_value(value) for key, value in config.to_dict().items()}
    return " ".join(f"{key}={toml_literal(key, value)}" for key, value in values.items())


def config_from_flower(run_config: dict, overrides: dict | None = None) -> tuple[RunConfig, bool]:
    """RunConfig and the ``resume`` flag from Flower's run config.

    ``run_config``: the fused config a ServerApp's context holds (the app's defaults with the overrides applied);
    ``overrides``: the keys given with ``--run-config`` (``grid.run.override_config``). With ``config-file`` the
    file is read first and only the given keys override it, as ``--set`` does; without it the fused config is
    the whole config. Values go through :meth:`RunConfig.from_dict` (the TOML and ``--set`` conversion and
    validation); a key this app does not declare is refused by Flower before the run starts."""
    run_config = dict(run_config)
    overrides = dict(run_config if overrides is None else overrides)
    resume = flag(run_config, "resume")
    path = str(run_config.get("config-file") or "")
    given = {k: v for k, v in (overrides if path else run_config).items() if k not in APP_KEYS}
    values = {}
    if path:
        values = load_config(path).to_dict()
    values.update(given)
    return RunConfig.from_dict(values, f"run config (config-file {path!r})" if path else "run config"), resume


def flag(run_config: dict, key: str) -> bool:
    """A boolean app key of Flower's run config (false when absent)."""
    value = run_config.get(key, False)
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "false", "0"):
        return str(value).lower() in ("true", "1")
    raise ConfigError(f"run config: {key} = {value!r}: expected true or false")


def pyproject_table(pyproject_text: str) -> dict:
    """The ``[tool.flwr.app.config]`` table of a pyproject.toml's text."""
    return tomllib.loads(pyproject_text)["tool"]["flwr"]["app"].get("config", {})


if __name__ == "__main__":  # the [tool.flwr.app.config] table for pyproject.toml
    import tomli_w
    print("[tool.flwr.app.config]\n" + tomli_w.dumps(app_config_table()), end="")

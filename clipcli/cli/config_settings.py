"""The settings commands of ``clipcli config``: show, get, set, unset, path.

They never import torch or transformers, so ``clipcli config show`` starts in a blink.
:func:`register` adds them to the ``config`` app (``clipcli/cli/config_cmd.py``).
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import typer

from clipcli.cli.common import Reporter, handle_errors, resolve_settings, signals_as_interrupt
from clipcli.errors import ConfigError, UsageError

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")]
FlagOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--flag",
        metavar="KEY=VALUE",
        help="Resolve as if KEY had been given as a command-line option (repeatable), "
        "to preview precedence. Example: --flag batch_size=8",
    ),
]


# ---------------------------------------------------------------- helpers (no heavy imports)


def _key(name: str) -> str:
    """Accept ``batch-size`` as well as ``batch_size`` (option spelling vs key spelling)."""
    return name.strip().lower().replace("-", "_")


def _check_key(name: str) -> str:
    from clipcli.settings import KEYS

    key = _key(name)
    if key not in KEYS:
        raise ConfigError(f"unknown settings key {name!r}; valid keys: {', '.join(KEYS)}")
    return key


def _parse_flags(items: list[str] | None) -> dict[str, str]:
    flags: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--flag expects KEY=VALUE, got {item!r}")
        flags[_check_key(name)] = value
    return flags


def format_value(value: Any) -> str:
    """A value as text that ``clipcli config set`` reads back ("" for none)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    return str(value)


def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _out(text: str) -> None:
    """Data on stdout (click.echo: CliRunner-friendly, closed pipes handled by handle_errors)."""
    typer.echo(text)


def _say(reporter: Reporter, text: str) -> None:
    """A status message on stderr (stdout is for data), silenced by --quiet."""
    if not reporter.quiet:
        typer.echo(text, err=True)


def _env_name(key: str) -> str:
    from clipcli.settings import ENV_PREFIX

    return ENV_PREFIX + key.upper()


# ---------------------------------------------------------------- settings commands

_commands = typer.Typer()


@_commands.command("show")
def show(
    as_json: JsonOpt = False,
    flag: FlagOpt = None,
) -> None:
    """Show every effective setting and where it comes from (flag, env, file or default).

    Precedence: command-line option > CLIPCLI_<KEY> environment variable > settings file > default.

    Example: clipcli config show --json
    """
    reporter = Reporter()
    with handle_errors(reporter):
        from clipcli.settings import KEYS

        resolved = resolve_settings(_parse_flags(flag))
        values = {key: getattr(resolved.settings, key) for key in KEYS}
        path = resolved.path
        if as_json:
            payload = {
                "path": str(path),
                "exists": bool(path and path.exists()),
                "settings": {
                    key: {"value": _json_value(values[key]), "origin": resolved.origins[key]} for key in KEYS
                },
            }
            _out(json.dumps(payload, indent=2))
            return
        rows = []
        for key in KEYS:
            origin = resolved.origins[key]
            if origin == "env":
                origin = f"env ({_env_name(key)})"
            shown = format_value(values[key]) if values[key] is not None else "none"
            rows.append((key, shown, origin))
        width_key = max(len(r[0]) for r in rows)
        width_value = max(len(r[1]) for r in rows)
        state = "" if path and path.exists() else " (not created yet)"
        lines = [f"# settings file: {path}{state}"]
        lines += [f"{k:<{width_key}}  {v:<{width_value}}  {o}" for k, v, o in rows]
        _out("\n".join(lines))


@_commands.command("get")
def get(
    key: Annotated[str, typer.Argument(help="Settings key, e.g. batch_size (see `clipcli config show`).", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the value as JSON (null for none).")] = False,
    flag: FlagOpt = None,
) -> None:
    """Print the effective value of one setting, alone (empty line for none): for scripts.

    Example: clipcli config get model
    """
    reporter = Reporter()
    with handle_errors(reporter):
        name = _check_key(key)
        value = getattr(resolve_settings(_parse_flags(flag)).settings, name)
        _out(json.dumps(_json_value(value)) if as_json else format_value(value))


@_commands.command("set")
def set_(
    key: Annotated[str, typer.Argument(help="Settings key, e.g. batch_size.", show_default=False)],
    value: Annotated[str, typer.Argument(help="New value, e.g. 64, true, 0.5,0.5,0.5 or none.", show_default=False)],
) -> None:
    """Validate and store one setting in the settings file (written atomically).

    Example: clipcli config set mean 0.5,0.5,0.5
    """
    reporter = Reporter()
    with handle_errors(reporter), signals_as_interrupt():
        from clipcli.settings import config_path, set_value

        name = _check_key(key)
        path = config_path()
        stored = set_value(name, value, path=path)
        _say(reporter, f"{name} = {format_value(stored) or 'none'} (in {path})")
        env = _env_name(name)
        if os.environ.get(env):
            reporter.warn(f"{env} is set in the environment and takes precedence over the settings file")


@_commands.command("unset")
def unset(
    key: Annotated[str, typer.Argument(help="Settings key to remove from the settings file.", show_default=False)],
) -> None:
    """Remove one setting from the settings file (its default applies again).

    Also removes an unknown or invalid key that makes the settings file unusable.

    Example: clipcli config unset batch_size
    """
    reporter = Reporter()
    with handle_errors(reporter), signals_as_interrupt():
        from clipcli.settings import KEYS, config_path, unset_value

        path = config_path()
        name = _key(key)
        # An unknown key is looked up as written, so that a stray key in the file can be removed.
        target = name if name in KEYS else key
        removed = unset_value(target, path=path)
        _say(reporter, f"removed {target} from {path}" if removed else f"{target} was not set in {path}")


@_commands.command("path")
def path_() -> None:
    """Print the settings file path ($CLIPCLI_CONFIG, or config.toml in the user config directory).

    Example: ${EDITOR:-vi} "$(clipcli config path)"
    """
    with handle_errors(Reporter()):
        from clipcli.settings import config_path

        _out(str(config_path()))


def register(app: typer.Typer) -> None:
    """Add the settings commands to the ``config`` app (same names, help and options)."""
    for info in _commands.registered_commands:
        app.registered_commands.append(info)

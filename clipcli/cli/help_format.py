"""How every command's help reads: metavars users expect, text that rich shows as written.

Typer labels values with Python types (``<str>``, ``<bool>``, ``<list[str]>``, ``{inputs}...``)
and renders help strings as rich markup, which swallows ``[ray]`` in ``pip install
'clipcli[ray]'``. :class:`ClipcliGroup`, the root group's class, fixes both once for the whole
command tree when the app is built, so no command module repeats metavars or escapes by hand.
It also refuses ``--flag true`` (a flag given a value), which would otherwise embed a file or a
text named ``true``. Nothing here imports torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

import typer
from typer.core import TyperArgument, TyperGroup

# Metavars by parameter name, where the type alone would say too little (``--model TEXT``).
NAMED_METAVARS = {
    "output": "PATH", "file": "PATH", "labels_file": "PATH", "image": "PATH|URL", "negative_image": "PATH|URL",
    "model": "MODEL", "tokenizer_from": "MODEL", "revision": "REV", "device": "DEVICE", "dtype": "DTYPE",
    "out_dtype": "DTYPE", "format": "FORMAT", "out_format": "FORMAT", "feature": "FEATURE",
    "preprocess": "PRESET", "resample": "FILTER", "mean": "R,G,B", "std": "R,G,B", "quantize": "MODE",
    "max_bytes": "BYTES", "max_pixels": "PIXELS", "timeout": "SECONDS", "idle_timeout": "SECONDS",
    "threshold": "SCORE", "labels": "LABELS", "template": "TEXT", "negative": "TEXT", "vector": "VECTOR",
    "keep": "RULE", "token": "TOKEN",
    # arguments
    "inputs": "INPUT", "texts": "TEXT", "queries": "QUERY", "vectors": "VECTORS", "source": "SOURCE",
    "key": "KEY", "value": "VALUE", "directory": "DIR",
}

# Values a flag given one would have: `--normalize true` (click would take `true` as an input).
FLAG_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "1", "0"})


def metavar_for(param: Any) -> str:
    """The metavar ``param`` gets: empty for flags, else by name, then by type (N, NUMBER, PATH...)."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return ""
    if param.metavar:
        return str(param.metavar)
    name = (param.name or "").rstrip("_")
    if name in NAMED_METAVARS:
        return NAMED_METAVARS[name]
    desc = param.type_descriptor
    annotation = desc.annotation
    if desc.is_choice:
        return "|".join(str(getattr(choice, "value", choice)) for choice in desc.choices or ())
    if desc.is_path:
        return "PATH"
    if annotation is int:
        return "N"
    if annotation is float:
        return "NUMBER"
    return name.upper() or "VALUE"


class _PlainArgument(TyperArgument):
    """An argument shown as ``INPUT...`` (usage and help), with no Python type label."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def display_type(self, ctx: Any) -> str:
        return ""

    def _usage_display_name(self) -> str:
        name = self.display_name_raw
        return name if self.required else f"[{name}]"


def escape_markup(text: str | None) -> str | None:
    """``text`` as rich shows it literally (``[ray]`` stays, not taken for a style tag)."""
    if not text:
        return text
    from rich.markup import escape

    return escape(text)


def tidy(command: Any, *, seen: set[int] | None = None) -> Any:
    """Metavars and literal help text for ``command`` and every command under it; returns it.

    The root group does this when built; a command built apart from the tree (``batch merge``,
    ``batch check``) is passed through this by whoever builds it.
    """
    # Typer makes the click objects itself; adjusting them here (metavar, and instance-level
    # wrappers of format_help / parse_args / get_help_option) leaves every command module's
    # declarations as they are. Arguments get a subclass: Typer ignores their metavar's type.
    seen = set() if seen is None else seen
    if id(command) in seen:
        return command
    seen.add(id(command))
    for param in command.params:
        _tidy_param(param)
    _tidy_help_option(command)
    _escape_when_shown(command)
    _refuse_flag_values(command)
    for sub in getattr(command, "commands", {}).values():
        tidy(sub, seen=seen)
    return command


def _tidy_param(param: Any) -> None:
    if getattr(param, "_clipcli_tidy", False):
        return
    param._clipcli_tidy = True
    if isinstance(param, TyperArgument):
        base = metavar_for(param)
        param.metavar = base + "..." if param.nargs != 1 else base
        param.__class__ = _PlainArgument
    else:
        param.metavar = metavar_for(param)


def _escape_when_shown(command: Any) -> None:
    """Escape the help texts a command's ``--help`` shows, when it is shown: rich.markup costs
    tens of milliseconds to import, which a one-liner that prints no help must not pay."""
    original = command.format_help

    def format_help(ctx: Any, formatter: Any) -> Any:
        for shown in (command, *getattr(command, "commands", {}).values()):
            _escape_texts(shown)
        for param in command.get_params(ctx):
            _escape_texts(param)
        return original(ctx, formatter)

    command.format_help = format_help


def _escape_texts(obj: Any) -> None:
    if getattr(obj, "_clipcli_escaped", False):
        return
    obj._clipcli_escaped = True
    for attr in ("help", "short_help", "epilog"):
        if isinstance(getattr(obj, attr, None), str):
            setattr(obj, attr, escape_markup(getattr(obj, attr)))


def _tidy_help_option(command: Any) -> None:
    """``--help`` is made per command on first use; give it the flag look (no ``<bool>``) too."""
    original = command.get_help_option

    def get_help_option(ctx: Any) -> Any:
        option = original(ctx)
        if option is not None:
            _tidy_param(option)
        return option

    command.get_help_option = get_help_option


def _refuse_flag_values(command: Any) -> None:
    """``--normalize true`` is an error naming the flag (exit 2), before any input is opened."""
    flags = {
        opt for param in command.params if getattr(param, "is_flag", False) for opt in (*param.opts, *param.secondary_opts)
    }
    if not flags:
        return
    original = command.parse_args

    def parse_args(ctx: Any, args: list[str]) -> list[str]:
        mistake = flag_value_mistake(args, flags)
        if mistake:
            _usage_line(mistake)
        return original(ctx, args)

    command.parse_args = parse_args


def flag_value_mistake(args: Iterable[str], flags: set[str]) -> str | None:
    """The message for a flag followed by ``true``/``false``/... that is no existing file, or None."""
    previous = None
    for arg in args:
        if arg == "--":
            return None  # what follows is taken literally
        if previous in flags and arg.lower() in FLAG_WORDS and not os.path.lexists(arg):
            return f"{arg}: no such file (flags take no value: {previous}, not {previous} {arg}; " \
                   f"an input literally named {arg!r} goes after --)"
        previous = arg
    return None


def _usage_line(message: str) -> None:
    try:
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
    except OSError:
        pass
    raise typer.Exit(2)


class ClipcliGroup(TyperGroup):
    """The root group: tidies the whole command tree once, when Typer builds it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        tidy(self)

    def get_params(self, ctx: Any) -> list[Any]:
        # Typer adds --install-completion / --show-completion after the group is built.
        params = super().get_params(ctx)
        for param in params:
            _tidy_param(param)
        return params

"""``clipcli config``: settings, model inspection, custom models (placeholder, being built)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Settings, model inspection and custom models.", no_args_is_help=True)

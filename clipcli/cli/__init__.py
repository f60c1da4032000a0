"""The ``clipcli`` Typer app: one module per command group, composed here."""

from __future__ import annotations

import typer

from clipcli import __version__
from clipcli.cli import batch_cmd, config_cmd, embed, search_cmd, serve_cmd
from clipcli.cli.help_format import ClipcliGroup

app = typer.Typer(
    name="clipcli",
    help="CLIP embeddings for images and texts, from the shell.\n\n"
    "Example: clipcli embed-image cat.jpg https://example.com/dog.png -o vectors.npy",
    cls=ClipcliGroup,  # metavars, literal help text, `--flag true` refused: for every command
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (README: Shell completion)
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"clipcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """CLIP embeddings for images and texts, from the shell."""


embed.register(app)
batch_cmd.register(app)
search_cmd.register(app)  # search, similar, dedup, index, classify
app.add_typer(config_cmd.app, name="config")
app.add_typer(serve_cmd.app, name="serve")


def main() -> None:
    """Console-script entry point."""
    app()

"""``clipcli config``: settings (show, get, set, unset, path), model inspection, custom models.

The settings commands never import torch or transformers, so ``clipcli config show`` starts in
a blink; ``config model`` and ``config new-model`` import them inside the command.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from clipcli.cli.common import (
    CropOpt,
    MeanOpt,
    PreprocessOpt,
    QuietOpt,
    Reporter,
    ResampleOpt,
    ResizeOpt,
    RevisionOpt,
    StdOpt,
    VerboseOpt,
    handle_errors,
    resolve_settings,
    settings_from,
    signals_as_interrupt,
)
from clipcli.errors import ConfigError, UsageError

app = typer.Typer(
    help="Settings, model inspection and custom models.\n\n"
    "Example: clipcli config set batch_size 64 && clipcli config show",
    no_args_is_help=True,
)

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
NEW_MODEL_VISION = "Vision tower (CLIPVisionConfig)"
NEW_MODEL_TEXT = "Text tower (CLIPTextConfig)"


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


@app.command("show")
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


@app.command("get")
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


@app.command("set")
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


@app.command("unset")
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


@app.command("path")
def path_() -> None:
    """Print the settings file path ($CLIPCLI_CONFIG, or config.toml in the user config directory).

    Example: ${EDITOR:-vi} "$(clipcli config path)"
    """
    with handle_errors(Reporter()):
        from clipcli.settings import config_path

        _out(str(config_path()))


# ---------------------------------------------------------------- model inspection


def _tower_rows(info: dict[str, Any]) -> list[tuple[str, str, str]]:
    vision = info["vision"] or {}
    text = info["text"] or {}

    def cell(table: dict[str, Any], name: str) -> str:
        value = table.get(name)
        return "-" if value is None else str(value)

    rows = [
        ("hidden size", "hidden_size", "hidden_size"),
        ("layers", "num_hidden_layers", "num_hidden_layers"),
        ("attention heads", "num_attention_heads", "num_attention_heads"),
        ("intermediate size", "intermediate_size", "intermediate_size"),
        ("image size", "image_size", None),
        ("patch size", "patch_size", None),
        ("vocab size", None, "vocab_size"),
        ("max positions", None, "max_position_embeddings"),
    ]
    out = [
        (label, cell(vision, v) if v else "-", cell(text, t) if t else "-") for label, v, t in rows
    ]
    features = info["features"]
    for kind in ("pooled", "projected"):
        out.append(
            (f"{kind} feature size", cell(features[kind], "vision"), cell(features[kind], "text"))
        )
    return out


def _preprocessing_rows(pre: dict[str, Any]) -> list[tuple[str, str]]:
    def numbers(values: list[float] | None) -> str:
        return "-" if values is None else ", ".join(f"{v:.8g}" for v in values)

    crop = pre.get("crop_size")
    return [
        ("preset", str(pre.get("preset")) + (" (customised)" if pre.get("custom") else "")),
        ("resize shortest edge", "-" if pre.get("resize_shortest_edge") is None else str(pre["resize_shortest_edge"])),
        *([("resize to", f"{pre['resize_fixed'][0]}x{pre['resize_fixed'][1]}")] if pre.get("resize_fixed") else []),
        ("center crop", "-" if crop is None else f"{crop[0]}x{crop[1]}"),
        ("mean", numbers(pre.get("mean"))),
        ("std", numbers(pre.get("std"))),
        ("resample", str(pre.get("resample") or "-")),
        ("rescale factor", f"{pre.get('rescale_factor', 1 / 255):.6g}"),
    ]


def _print_model_tables(info: dict[str, Any]) -> None:
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=sys.stdout, highlight=False, soft_wrap=False)
    title = f"{escape(info['model'])} ({info['model_type']}: {info.get('family', 'clip')}, {info.get('layout', '')})"
    if info.get("revision"):
        title += f" @ {escape(str(info['revision']))}"
    towers = Table(title=title, box=box.SIMPLE, title_justify="left")
    towers.add_column("")
    towers.add_column("vision", justify="right")
    towers.add_column("text", justify="right")
    for row in _tower_rows(info):
        towers.add_row(*row)
    console.print(towers)
    if info.get("projection_dim") is not None:
        console.print(f"projection dim: {info['projection_dim']}")
    for tower, why in (info.get("projection_notes") or {}).items():
        console.print(f"projected {tower} features: {escape(why)}")
    for feature, note in (info.get("feature_notes") or {}).items():
        console.print(f"{feature}: {escape(note)}")
    if info.get("text_padding"):
        console.print(f"text padding: {escape(info['text_padding'])}")
    if info.get("preprocessing"):
        pre = Table(title="image preprocessing", box=box.SIMPLE, title_justify="left")
        pre.add_column("")
        pre.add_column("value")
        for row in _preprocessing_rows(info["preprocessing"]):
            pre.add_row(*row)
        console.print(pre)


@app.command("model")
def model_(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Argument(help="Hub id or local checkpoint directory. [default: the `model` setting]", show_default=False)] = None,
    revision: RevisionOpt = None,
    preprocess: PreprocessOpt = None,
    resize: ResizeOpt = None,
    crop_size: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    resample: ResampleOpt = None,
    as_json: JsonOpt = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show a checkpoint's family and layout, vision/text configuration, feature sizes and meanings, text padding and image preprocessing.

    Reads only the config and preprocessor files (and a local lone tower's weight names), not the weights. The preprocessing shown is the one embed-image would use with the same settings and options.

    Example: clipcli config model openai/clip-vit-base-patch32 --preprocess imagenet --json
    """
    reporter = Reporter(quiet=quiet, verbose=verbose)
    with handle_errors(reporter):
        settings = settings_from(ctx)
        from clipcli.inspect_model import inspect_model
        from clipcli.preprocess import PreprocessSpec

        reporter.info(f"reading the configuration of {settings.model}")
        info = inspect_model(
            settings.model, settings.revision, preprocess=PreprocessSpec.from_settings(settings)
        )
        if as_json:
            _out(json.dumps(info, indent=2))
        else:
            _print_model_tables(info)


# ---------------------------------------------------------------- custom models


def _check_target(directory: Path, force: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise UsageError(f"{directory} is not empty (use --force to write the checkpoint into it anyway)")


@app.command("new-model")
def new_model(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Directory to write the checkpoint to.", show_default=False)],
    vision_hidden_size: Annotated[int, typer.Option(help="Vision hidden size.", rich_help_panel=NEW_MODEL_VISION)] = 768,
    vision_heads: Annotated[int, typer.Option(help="Vision attention heads (must divide the hidden size).", rich_help_panel=NEW_MODEL_VISION)] = 12,
    vision_layers: Annotated[int, typer.Option(help="Vision transformer layers.", rich_help_panel=NEW_MODEL_VISION)] = 12,
    vision_intermediate_size: Annotated[int, typer.Option(help="Vision MLP size.", rich_help_panel=NEW_MODEL_VISION)] = 3072,
    image_size: Annotated[int, typer.Option(help="Input image size in pixels (also the preprocessing resize and crop).", rich_help_panel=NEW_MODEL_VISION)] = 224,
    patch_size: Annotated[int, typer.Option(help="Patch size in pixels (must divide the image size).", rich_help_panel=NEW_MODEL_VISION)] = 32,
    vocab_size: Annotated[int, typer.Option(help="Text vocabulary size (at least the tokenizer's size).", rich_help_panel=NEW_MODEL_TEXT)] = 49408,
    text_hidden_size: Annotated[int, typer.Option(help="Text hidden size.", rich_help_panel=NEW_MODEL_TEXT)] = 512,
    text_heads: Annotated[int, typer.Option(help="Text attention heads (must divide the hidden size).", rich_help_panel=NEW_MODEL_TEXT)] = 8,
    text_layers: Annotated[int, typer.Option(help="Text transformer layers.", rich_help_panel=NEW_MODEL_TEXT)] = 12,
    text_intermediate_size: Annotated[int, typer.Option(help="Text MLP size.", rich_help_panel=NEW_MODEL_TEXT)] = 2048,
    max_positions: Annotated[int, typer.Option(help="Longest text in tokens, BOS and EOS included.", rich_help_panel=NEW_MODEL_TEXT)] = 77,
    projection_dim: Annotated[int, typer.Option(help="Size of the joint image-text space (--feature projected).")] = 512,
    seed: Annotated[int, typer.Option(min=0, help="Random seed of the weight initialisation.")] = 0,
    tokenizer_from: Annotated[str | None, typer.Option(help="Copy the tokenizer of this model (hub id or directory), e.g. openai/clip-vit-base-patch32. [default: a built-in byte-level vocabulary]", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into DIR even if it is not empty (files of the same name are replaced).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary instead of the directory path.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a new CLIP checkpoint with a custom configuration and RANDOM (untrained) weights.

    The defaults are ViT-B/32. The directory works as --model with every command; its vectors are not meaningful until the model is trained. Prints the directory on stdout.

    Example: clipcli config new-model ./tiny --vision-hidden-size 64 --vision-heads 4 --vision-layers 2 --image-size 64 --patch-size 8 --text-hidden-size 64 --text-heads 4 --text-layers 2 --projection-dim 32
    """
    reporter = Reporter(quiet=quiet)
    with handle_errors(reporter):
        from clipcli.modelbuild import TextParams, VisionParams, build_checkpoint, validate

        vision = VisionParams(
            hidden_size=vision_hidden_size, num_attention_heads=vision_heads, num_hidden_layers=vision_layers,
            intermediate_size=vision_intermediate_size, image_size=image_size, patch_size=patch_size,
        )
        text = TextParams(
            vocab_size=vocab_size, hidden_size=text_hidden_size, num_attention_heads=text_heads,
            num_hidden_layers=text_layers, intermediate_size=text_intermediate_size,
            max_position_embeddings=max_positions,
        )
        validate(vision, text, projection_dim)  # before the directory check and the slow imports
        _check_target(directory, force)
        summary = build_checkpoint(
            directory, vision=vision, text=text, projection_dim=projection_dim, seed=seed,
            tokenizer_from=tokenizer_from,
        )
        _say(
            reporter,
            f"wrote a CLIP checkpoint with {summary['parameters']:,} parameters to {directory}; "
            "its weights are randomly initialised (untrained), so its vectors carry no meaning"
        )
        _out(json.dumps(summary, indent=2) if as_json else str(directory))

"""``clipcli config``: settings (show, get, set, unset, path: in ``config_settings``), model
inspection, custom models.

The settings commands never import torch or transformers, so ``clipcli config show`` starts in
a blink; ``config model`` and ``config new-model`` import them inside the command.
"""

from __future__ import annotations

import json
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
    settings_from,
)
from clipcli.cli import config_settings
from clipcli.cli.config_settings import JsonOpt, _out, _say
from clipcli.errors import UsageError

app = typer.Typer(
    help="Settings, model inspection and custom models.\n\n"
    "Example: clipcli config set batch_size 64 && clipcli config show",
    no_args_is_help=True,
)

NEW_MODEL_VISION = "Vision tower (CLIPVisionConfig)"
NEW_MODEL_TEXT = "Text tower (CLIPTextConfig)"


config_settings.register(app)


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

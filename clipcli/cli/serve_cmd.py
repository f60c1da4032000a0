"""``clipcli serve``: a warm model server; ``clipcli serve status`` and ``clipcli serve stop``.

The server loads the model once, with the same settings resolution as every command, and
listens on a Unix socket named after those settings in a private per-user directory. The
``embed-image`` / ``embed-text`` one-liners find it there and skip the model load. Nothing here
imports torch until a server actually starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from clipcli.cli.common import (
    EXIT_MODEL,
    EXIT_OK,
    BatchSizeOpt,
    CompileOpt,
    FastDecodeOpt,
    QuantizeOpt,
    CropOpt,
    DeviceOpt,
    DtypeOpt,
    FeatureOpt,
    MeanOpt,
    ModelOpt,
    NormalizeOpt,
    PreprocessOpt,
    QuietOpt,
    Reporter,
    ResampleOpt,
    ResizeOpt,
    RevisionOpt,
    StdOpt,
    VerboseOpt,
    WorkersOpt,
    handle_errors,
    resolve_settings,
    settings_from,
)
from clipcli.cli.serve_run import ask, clean_stale, run_serve

SERVE_PANEL = "Server"
STOP_WAIT = 45.0

app = typer.Typer(
    help="A warm model server: embed-image and embed-text use it by themselves and skip the model load.\n\n"
    "Example: clipcli serve --detach --idle-timeout 600 && clipcli embed-text 'a cat'",
    invoke_without_command=True,
)

DetachOpt = Annotated[bool, typer.Option("--detach", "-d", help="Run in the background; return once the server answers.", rich_help_panel=SERVE_PANEL)]
IdleOpt = Annotated[float, typer.Option("--idle-timeout", metavar="SECONDS", help="Exit (removing the socket) after this long without requests; 0: never.", rich_help_panel=SERVE_PANEL)]
ListenOpt = Annotated[str | None, typer.Option("--listen", metavar="HOST:PORT", help="Also listen on TCP (HOST defaults to 127.0.0.1); needs a token.", rich_help_panel=SERVE_PANEL)]
TokenOpt = Annotated[str | None, typer.Option("--token", help="Token TCP clients must send (better: the CLIPCLI_SERVE_TOKEN variable; argv is visible to other users).", rich_help_panel=SERVE_PANEL, show_default=False)]


def _settings_flags(**flags: Any) -> dict[str, Any]:
    return flags


@app.callback(invoke_without_command=True)
def serve(
    ctx: typer.Context,
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    feature: FeatureOpt = None,
    normalize: NormalizeOpt = None,
    batch_size: BatchSizeOpt = None,
    preprocess: PreprocessOpt = None,
    resize: ResizeOpt = None,
    crop_size: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    resample: ResampleOpt = None,
    workers: WorkersOpt = None,
    quantize: QuantizeOpt = None,
    fast_decode: FastDecodeOpt = None,
    compile: CompileOpt = None,
    detach: DetachOpt = False,
    idle_timeout: IdleOpt = 0.0,
    listen: ListenOpt = None,
    token: TokenOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Load the model once and serve embed-image / embed-text one-liners from it.

    The server answers clients with the same model settings (model, revision, device, dtype,
    feature, normalize, preprocessing): give `serve` the options you give the one-liners, or put
    them in the settings file. Image files and URLs are read by the server; texts are sent.

    Example: clipcli serve --detach --idle-timeout 600; clipcli serve status; clipcli serve stop
    """
    if ctx.invoked_subcommand is not None:
        return
    reporter = Reporter(quiet=quiet, verbose=verbose)
    with handle_errors(reporter):
        settings = settings_from(ctx)
        code = run_serve(settings, reporter, detach=detach, idle_timeout=idle_timeout, listen=listen, token=token)
    raise typer.Exit(code)


# ---------------------------------------------------------------------------- status / stop


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _describe(st: dict[str, Any]) -> str:
    pre = st.get("preprocess") or {}
    pre_text = ", ".join(f"{k} {v}" for k, v in pre.items() if v is not None)
    slots = st.get("slots") or {}
    lines = [
        ", ".join(st.get("sockets") or [str(st.get("socket"))]),
        f"  pid {st.get('pid')}, up {_duration(st.get('uptime', 0))}, clipcli {st.get('clipcli_version')}"
        + (f", TCP {st['tcp']}" if st.get("tcp") else "")
        + (f", idle timeout {st['idle_timeout']:g} s" if st.get("idle_timeout") else ""),
        f"  model {st.get('model')}" + (f" (revision {st['revision']})" if st.get("revision") else "")
        + f", device {st.get('device')} ({st.get('device_asked')} asked), dtype {st.get('dtype')}",
        f"  feature {st.get('feature')}, normalize {'yes' if st.get('normalize') else 'no'}, preprocessing: {pre_text}",
        f"  requests {st.get('requests')} served ({st.get('inputs')} inputs), {st.get('active')} running, "
        f"queue {st.get('queue')}, {st.get('forward_passes')} forward passes ({st.get('merged_passes')} merged, "
        f"{st.get('split_passes', 0)} split)",
        f"  connections: {slots.get('unix', 0)} unix socket, {slots.get('tcp', 0)} TCP, "
        f"{slots.get('preauth', 0)} TCP waiting for a token",
    ]
    return "\n".join(lines)


@app.command("status")
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list (for scripts).")] = False,
) -> None:
    """Show the servers running for this user: model, device, uptime, requests served, queue.

    Exit status 3 when none runs.

    Example: clipcli serve status --json | jq '.[0].device'
    """
    from clipcli.serve.client import list_sockets

    reporter = Reporter()
    with handle_errors(reporter):
        directory, socks = list_sockets()
        found = _servers(socks)
        if as_json:
            typer.echo(json.dumps(found, indent=2))
        else:
            for st in found:
                typer.echo(_describe(st))
        if not found:
            reporter._line(f"no clipcli server is running (socket directory {directory})")
            raise typer.Exit(EXIT_MODEL)
    raise typer.Exit(EXIT_OK)


@app.command("stop")
def stop(
    model: ModelOpt = None,
    revision: RevisionOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    feature: FeatureOpt = None,
    normalize: NormalizeOpt = None,
    preprocess: PreprocessOpt = None,
    resize: ResizeOpt = None,
    crop_size: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    resample: ResampleOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Stop the servers of this user: all of them, or with model options only the one serving them.

    Running requests finish first. Exit 0 also when none was running.

    Example: clipcli serve stop --model ./my-checkpoint   (only the server of that model)
    """
    from clipcli.serve.client import list_sockets
    from clipcli.serve.protocol import runtime_dir, settings_key, socket_path

    reporter = Reporter(quiet=quiet)
    flags = _settings_flags(model=model, revision=revision, device=device, dtype=dtype, feature=feature,
                            normalize=normalize, preprocess=preprocess, resize=resize, crop_size=crop_size,
                            mean=mean, std=std, resample=resample)
    with handle_errors(reporter):
        if any(v is not None for v in flags.values()):
            settings = resolve_settings(flags).settings
            directory = runtime_dir()
            wanted = socket_path(directory, settings_key(settings, "image"))
            socks = [wanted] if wanted.exists() else []
        else:
            directory, socks = list_sockets()
        stopped = 0
        for st in _servers(socks):
            sock = Path(st["socket"])
            if ask(sock, "stop") is None:
                continue
            gone = _wait_gone([Path(p) for p in st.get("sockets") or [sock]], int(st.get("pid") or 0))
            stopped += 1
            if not gone:
                reporter.warn(f"the clipcli server pid {st.get('pid')} is still finishing running requests")
            elif not quiet:
                reporter._line(f"stopped the clipcli server pid {st.get('pid')} (model {st.get('model')})")
        if not stopped and not quiet:
            reporter._line("no clipcli server was running" + (" for these settings" if any(
                v is not None for v in flags.values()) else ""))
    raise typer.Exit(EXIT_OK)


def _servers(socks: list[Path]) -> list[dict[str, Any]]:
    """The status of each server answering on ``socks`` (once per server); stale sockets removed."""
    found: dict[Any, dict[str, Any]] = {}
    for sock in socks:
        st = ask(sock, "status")
        if st is None:
            clean_stale(sock)
            continue
        found.setdefault(st.get("pid"), st)
    return list(found.values())


def _wait_gone(socks: list[Path], pid: int) -> bool:
    """Wait until the server has removed its socket and exited (running requests finish first)."""
    deadline = time.monotonic() + STOP_WAIT
    while time.monotonic() < deadline:
        alive = False
        if pid:
            try:
                os.kill(pid, 0)
                alive = True
            except ProcessLookupError:
                pass
            except PermissionError:
                alive = True
            if alive:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)  # reap it if it happens to be our child
        if not alive and not any(sock.exists() for sock in socks):
            return True
        time.sleep(0.05)
    return False

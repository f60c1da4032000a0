"""Shared CLI pieces: option types, settings resolution, messages and exit codes.

Commands parse flags and call the library; this module turns library exceptions into one-line
messages on stderr and the documented exit codes. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from clipcli.errors import ClipcliError, StorageError, storage_error
from clipcli.sources import safe_display

EXIT_OK = 0
EXIT_INPUTS_FAILED = 1
EXIT_USAGE = 2
EXIT_MODEL = 3
EXIT_LOCKED = 4
EXIT_STORAGE = 5  # an output could not be written (disk full, read-only, I/O error)
EXIT_INTERRUPTED = 130

MODEL_PANEL = "Model"
PRE_PANEL = "Preprocessing"
OUT_PANEL = "Output"
IN_PANEL = "Inputs"

# ---- option types shared by the commands (None = not given, so settings/env/defaults apply)
ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Hub id or local checkpoint directory. (default: openai/clip-vit-base-patch32)", rich_help_panel=MODEL_PANEL)]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub revision: branch, tag or commit.", rich_help_panel=MODEL_PANEL)]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps. (default: auto)", rich_help_panel=MODEL_PANEL)]
DtypeOpt = Annotated[str | None, typer.Option(help="auto, float32, float16 or bfloat16 (auto: float32 on CPU). (default: auto)", rich_help_panel=MODEL_PANEL)]
FeatureOpt = Annotated[str | None, typer.Option(help="pooled (tower pooler_output) or projected (joint image-text space). (default: pooled)", rich_help_panel=MODEL_PANEL)]
NormalizeOpt = Annotated[bool | None, typer.Option("--normalize/--no-normalize", help="L2-normalise the vectors. (default: no)", rich_help_panel=MODEL_PANEL, show_default=False)]
BatchSizeOpt = Annotated[int | None, typer.Option("--batch-size", "-b", help="Inputs per forward pass. (default: 32)", rich_help_panel=MODEL_PANEL)]
OutputOpt = Annotated[str | None, typer.Option("--output", "-o", help="Output file (format from its extension: .jsonl .json .npy .npz .tsv .parquet) or - for stdout. (default: stdout)", rich_help_panel=OUT_PANEL)]
FormatOpt = Annotated[str | None, typer.Option("--format", "-f", help="jsonl, json, npy, npz, tsv or parquet (overrides the extension).", rich_help_panel=OUT_PANEL)]
OutDtypeOpt = Annotated[str | None, typer.Option(help="float32 or float16 for written vectors. (default: float32)", rich_help_panel=OUT_PANEL)]
PreprocessOpt = Annotated[str | None, typer.Option(help="Preset: clip (the checkpoint's own) or imagenet (ImageNet mean/std). (default: clip)", rich_help_panel=PRE_PANEL)]
ResizeOpt = Annotated[int | None, typer.Option(help="Resize the shortest edge to N pixels.", rich_help_panel=PRE_PANEL)]
CropOpt = Annotated[int | None, typer.Option("--crop-size", help="Center-crop to N×N pixels.", rich_help_panel=PRE_PANEL)]
MeanOpt = Annotated[str | None, typer.Option(help="Normalisation mean, 3 numbers: '0.5,0.5,0.5'.", rich_help_panel=PRE_PANEL)]
StdOpt = Annotated[str | None, typer.Option(help="Normalisation std, 3 numbers: '0.5,0.5,0.5'.", rich_help_panel=PRE_PANEL)]
ResampleOpt = Annotated[str | None, typer.Option(help="Resize filter: nearest, bilinear, bicubic, lanczos, box, hamming.", rich_help_panel=PRE_PANEL)]
TimeoutOpt = Annotated[float | None, typer.Option(help="URL connect/read timeout in seconds. (default: 30)", rich_help_panel=IN_PANEL)]
RetriesOpt = Annotated[int | None, typer.Option(help="URL retries on connection errors, 429 and 5xx. (default: 3)", rich_help_panel=IN_PANEL)]
MaxBytesOpt = Annotated[int | None, typer.Option("--max-bytes", help="Largest URL download in bytes. (default: 52428800)", rich_help_panel=IN_PANEL)]
MaxPixelsOpt = Annotated[int | None, typer.Option("--max-pixels", help="Largest image in pixels. (default: 89478485)", rich_help_panel=IN_PANEL)]
WorkersOpt = Annotated[int | None, typer.Option(help="Loader threads (0: automatic).", rich_help_panel=IN_PANEL)]
QuantizeOpt = Annotated[str | None, typer.Option(help="int8: dynamic int8 quantisation of the linear layers on CPU (2-4x faster; min cosine to float32 0.9992 on the bench, see README); none: off.", rich_help_panel=MODEL_PANEL)]
FastDecodeOpt = Annotated[bool | None, typer.Option("--fast-decode/--no-fast-decode", help="Decode large JPEGs at reduced size (Pillow draft mode): faster, vectors differ slightly from the exact path.", rich_help_panel=PRE_PANEL, show_default=False)]
CompileOpt = Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model (slow first batch; falls back with a warning if it fails).", rich_help_panel=MODEL_PANEL, show_default=False)]
FailFastOpt = Annotated[bool, typer.Option("--fail-fast", help="Stop at the first input that fails.", rich_help_panel=IN_PANEL)]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Say more on stderr (device picked, model loading).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Nothing on stderr but errors.")]


def resolve_settings(flags: dict[str, Any]) -> Any:
    """Flags (None = not given) > CLIPCLI_* env > settings file > defaults."""
    from clipcli.settings import resolve

    return resolve(flags)


def settings_from(ctx: typer.Context, **overrides: Any) -> Any:
    """The effective Settings of a command: its parameters named like settings keys are flags.

    Every command declares the settings options it offers with the shared option types above
    (None = not given); this picks them out of the parsed parameters, so no command repeats the
    list of keys.
    """
    from clipcli.settings import KEYS

    flags = {key: value for key, value in ctx.params.items() if key in KEYS}
    flags.update(overrides)
    return resolve_settings(flags).settings


def refuse_no_inputs(outdir: str, given: list[str]) -> None:
    """``batch`` found nothing to embed: into a new OUTDIR that is "no inputs" (UsageError, exit
    2, before any model load); an existing OUTDIR is left to the mass-deletion guard."""
    from pathlib import Path

    from clipcli.batch.layout import MANIFEST
    from clipcli.errors import UsageError

    if not (Path(outdir) / MANIFEST).exists():
        names = ", ".join("stdin" if name == "-" else name for name in given)
        raise UsageError(f"no inputs to embed ({names} gave none); nothing written")


class Reporter:
    """Messages on stderr: skips, warnings, the summary. stdout carries data only."""

    def __init__(self, *, quiet: bool = False, verbose: bool = False) -> None:
        self.quiet = quiet
        self.verbose = verbose
        self.failed = 0

    def skip(self, source: str, reason: str) -> None:
        self.failed += 1
        self._line(f"skipping {safe_display(source)}: {reason}")

    def warn(self, message: str) -> None:
        if not self.quiet:
            self._line(f"warning: {message}")

    def info(self, message: str) -> None:
        if self.verbose and not self.quiet:
            self._line(message)

    def error(self, message: str) -> None:
        self._line(f"error: {message}")

    @staticmethod
    def _line(text: str) -> None:
        try:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
        except (BrokenPipeError, OSError):
            pass


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, turned into the same clean stop as Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signame = signal.Signals(signum).name


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGTERM (``timeout``, systemd, cron wrappers) and SIGHUP (a closed terminal) stop the run
    as Ctrl-C does: the KeyboardInterrupt unwinds through the writers, which remove their temp
    files, and :func:`handle_errors` exits 130.

    A signal the caller ignores (``nohup`` ignores SIGHUP) stays ignored. Signals arriving while
    the run is already stopping are ignored, so the cleanup itself is not cut short. Outside the
    main thread (an embedding host) signals are left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if stopping:
            return
        stopping.append(signum)
        raise Interrupted(signum)

    previous: dict[int, Any] = {}
    for name in ("SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is None or signal.getsignal(signum) == signal.SIG_IGN:
            continue
        previous[signum] = signal.signal(signum, handler)
    if hasattr(signal, "SIGXFSZ"):
        # A file size limit (`ulimit -f`) is then an EFBIG write error with a message (exit 5),
        # not a silent core dump. CPython ignores it at start-up; an embedding host may not.
        previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def handle_errors(reporter: Reporter | None = None) -> Iterator[None]:
    """Turn clipcli errors, Ctrl-C, closed pipes and stray OS errors into one message line and
    the documented exit code; never a traceback. Commands that write put
    :func:`signals_as_interrupt` inside it, so SIGTERM/SIGHUP end the same way as Ctrl-C."""
    reporter = reporter or Reporter()
    try:
        yield
    except ClipcliError as exc:
        reporter.error(str(exc))
        if isinstance(exc, StorageError):
            _drop_unwritable_stdout()
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:
        reporter.error(f"interrupted ({exc.signame})" if isinstance(exc, Interrupted) else "interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:
        # The reader went away (`| head -n 1`): that is a normal end for a pipe.
        _silence_stdout()
        raise typer.Exit(EXIT_OK) from None
    except OSError as exc:
        # Library write paths raise StorageError; this is the net for one that was missed.
        error = storage_error(exc.filename or "a file", exc, doing="write or read")
        reporter.error(str(error))
        _drop_unwritable_stdout()
        raise typer.Exit(error.exit_code) from None


def _drop_unwritable_stdout() -> None:
    """stdout on a full disk: data still buffered would fail again, noisily, at exit."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        _silence_stdout()


def _silence_stdout() -> None:
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())

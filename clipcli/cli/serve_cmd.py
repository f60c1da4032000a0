"""``clipcli serve``: a warm model server; ``clipcli serve status`` and ``clipcli serve stop``.

The server loads the model once, with the same settings resolution as every command, and
listens on a Unix socket named after those settings in a private per-user directory. The
``embed-image`` / ``embed-text`` one-liners find it there and skip the model load. Nothing here
imports torch until a server actually starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
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
from clipcli.errors import OutputLockedError, UsageError

SERVE_PANEL = "Server"
START_TIMEOUT = 600.0  # --detach: how long the model may take to load
STOP_WAIT = 45.0
MIN_TOKEN = 16

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


# ---------------------------------------------------------------------------- serve


def _prepare(settings: Any, listen: str | None, token: str | None, idle_timeout: float) -> dict[str, Any]:
    """Check everything that can be checked before loading a model."""
    from clipcli.serve.protocol import (
        MAX_SOCKET_PATH,
        TOKEN_ENV,
        UnsafeDirectory,
        ensure_private_dir,
        lock_path,
        log_path,
        parse_address,
        runtime_dir,
        settings_key,
        socket_path,
    )

    if idle_timeout < 0:
        raise UsageError("--idle-timeout must be >= 0 (0: never)")
    tcp = None
    token = token or os.environ.get(TOKEN_ENV) or None
    if listen:
        try:
            tcp = parse_address(listen)
        except ValueError as exc:
            raise UsageError(f"--listen: {exc}") from None
        if not token:
            raise UsageError(f"--listen needs a token: pass --token or set {TOKEN_ENV} (clients send it)")
        if len(token) < MIN_TOKEN:
            raise UsageError(
                f"the token must have at least {MIN_TOKEN} characters "
                "(make one: python -c 'import secrets; print(secrets.token_urlsafe())')"
            )
    try:
        directory = ensure_private_dir(runtime_dir())
    except UnsafeDirectory as exc:
        raise UsageError(f"refusing to start: {exc}") from None
    keys = {kind: settings_key(settings, kind) for kind in ("image", "text")}
    sock = socket_path(directory, keys["image"])
    if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
        raise UsageError(
            f"socket path {sock} is too long for a Unix socket; set CLIPCLI_RUNTIME_DIR to a shorter directory"
        )
    return {"directory": directory, "keys": keys, "socket": sock, "lock": lock_path(directory, keys["image"]),
            "text_socket": socket_path(directory, keys["text"]), "text_lock": lock_path(directory, keys["text"]),
            "log": log_path(directory, keys["image"]), "tcp": tcp, "token": token, "listen": listen}


def run_serve(settings: Any, reporter: Reporter, *, detach: bool = False, idle_timeout: float = 0.0,
              listen: str | None = None, token: str | None = None) -> int:
    """Run the server in the foreground (until stopped) or start it in the background."""
    where = _prepare(settings, listen, token, idle_timeout)
    if detach:
        return _detach(settings, where, reporter, idle_timeout=idle_timeout)
    lock_fds = [_acquire_lock(where["lock"], where["socket"])]
    sockets = [where["socket"]]
    try:
        # The text socket (no preprocessing in its key) may already belong to a server of the same
        # model with other preprocessing: then that one answers embed-text.
        lock_fds.append(_acquire_lock(where["text_lock"], where["text_socket"]))
        sockets.append(where["text_socket"])
    except OutputLockedError:
        pass
    try:
        return _serve_foreground(settings, where, tuple(sockets), reporter, idle_timeout=idle_timeout)
    finally:
        for fd in lock_fds:
            os.close(fd)


def _acquire_lock(path: Path, sock: Path) -> int:
    """Hold ``<key>.lock`` for the server's lifetime: one server per settings key."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        with contextlib.suppress(OSError):
            pid = os.pread(fd, 32, 0).decode().strip()
        os.close(fd)
        raise OutputLockedError(
            f"a clipcli server for these settings is already running (pid {pid or '?'}, socket {sock})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _setup_logging(reporter: Reporter) -> logging.Logger:
    log = logging.getLogger("clipcli.serve")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s clipcli serve: %(message)s", "%Y-%m-%d %H:%M:%S"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.WARNING if reporter.quiet else logging.DEBUG if reporter.verbose else logging.INFO)
    return log


def _serve_foreground(settings: Any, where: dict[str, Any], sockets: tuple[Path, ...], reporter: Reporter, *,
                      idle_timeout: float) -> int:
    from clipcli.cli.embed import build_encoder
    from clipcli.serve.server import EmbedServer, ServerOptions

    log = _setup_logging(reporter)
    encoder = build_encoder(settings, reporter)
    options = ServerOptions(
        socket_paths=sockets, idle_timeout=idle_timeout, tcp=where["tcp"], token=where["token"],
        max_rows=settings.batch_size,
    )
    server = EmbedServer(encoder, settings, options, keys=where["keys"])
    server.load()
    server.bind()

    def on_signal(signum: int, _frame: Any) -> None:
        if server.stop_reason:  # a second signal: stop waiting for running requests
            raise KeyboardInterrupt
        server.request_stop(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    status = server.status()
    extra = f", TCP {status['tcp']}" if status["tcp"] else ""
    idle = f", idle timeout {idle_timeout:g} s" if idle_timeout else ""
    log.info(f"ready (pid {os.getpid()}): model {settings.model}, device {status['device']}, dtype {status['dtype']}, "
             f"feature {settings.feature}{', normalized' if settings.normalize else ''}; sockets "
             f"{', '.join(map(str, sockets))}{extra}{idle}")
    if len(sockets) == 1:
        log.info(f"embed-text requests go to the server already on {where['text_socket']}")
    if where["tcp"] and where["tcp"][0] not in ("127.0.0.1", "::1", "localhost"):
        log.warning(f"TCP on {where['tcp'][0]}, not loopback: whoever has the token can make this server read "
                    "files and fetch URLs as you")
    for tower, state in status["towers"].items():
        if state != "ready":
            log.warning(f"{tower} requests will fail: {state}")
    server.serve_forever()
    log.info(f"stopped ({server.stop_reason or 'done'}) after {server.status()['requests']} requests")
    return EXIT_OK


def _flags_for(settings: Any) -> list[str]:
    """Command-line flags that reproduce the model settings in a child process."""
    s = settings
    args = ["--model", s.model, "--device", s.device, "--dtype", s.dtype, "--feature", s.feature,
            "--normalize" if s.normalize else "--no-normalize", "--batch-size", str(s.batch_size),
            "--preprocess", s.preprocess, "--workers", str(s.workers)]
    if s.revision:
        args += ["--revision", s.revision]
    for name, flag in (("resize", "--resize"), ("crop_size", "--crop-size"), ("resample", "--resample")):
        if getattr(s, name) is not None:
            args += [flag, str(getattr(s, name))]
    for name in ("mean", "std"):
        if getattr(s, name) is not None:
            args += [f"--{name}", ",".join(repr(float(v)) for v in getattr(s, name))]
    return args


def _detach(settings: Any, where: dict[str, Any], reporter: Reporter, *, idle_timeout: float) -> int:
    from clipcli.serve.client import Client, ServerError, Target
    from clipcli.serve.protocol import TOKEN_ENV

    sock: Path = where["socket"]
    running = _ask(sock, "hello")
    if running is not None and (running.get("keys") or {}).get("image") == where["keys"]["image"]:
        if not reporter.quiet:
            reporter._line(
                f"a clipcli server for these settings is already running (pid {running.get('pid')}, socket {sock})"
            )
        return EXIT_OK
    args = [sys.executable, "-m", "clipcli", "serve", *_flags_for(settings),
            "--idle-timeout", repr(float(idle_timeout))]
    if where["listen"]:
        args += ["--listen", where["listen"]]
    if reporter.verbose:
        args.append("--verbose")
    env = dict(os.environ)
    if where["token"]:
        env[TOKEN_ENV] = where["token"]  # not on the command line: argv is visible to everyone
    log_file: Path = where["log"]
    with contextlib.suppress(FileNotFoundError):
        if log_file.is_symlink():
            log_file.unlink()
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_fd,
                                start_new_session=True, env=env, close_fds=True)
    finally:
        os.close(log_fd)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        code = proc.poll()
        if code is not None:
            text = log_file.read_text(encoding="utf-8", errors="replace").strip()
            lines = [line for line in text.splitlines() if line.strip()]
            for line in lines[-10:]:
                reporter._line(line)
            if not lines:
                reporter.error(f"the server exited with status {code} before answering")
            return code or EXIT_MODEL
        if sock.exists():
            try:
                with Client.connect(Target(path=sock), timeout=2.0) as client:
                    info = client.hello()
                if info.get("pid") == proc.pid:
                    if not reporter.quiet:
                        reporter._line(f"clipcli server running in the background (pid {proc.pid}, socket {sock}, "
                                       f"log {log_file}); stop it with `clipcli serve stop`")
                    return EXIT_OK
            except ServerError:
                pass
        if time.monotonic() > deadline:
            proc.terminate()
            reporter.error(f"the server did not answer within {START_TIMEOUT:g} s; see {log_file}")
            return EXIT_MODEL
        time.sleep(0.05)


def _ask(sock: Path, op: str) -> dict[str, Any] | None:
    """One request to the server on ``sock``; None when nothing answers there."""
    from clipcli.serve.client import Client, ServerError, Target

    try:
        with Client.connect(Target(path=sock), timeout=2.0) as client:
            if op == "hello":
                return client.hello()
            if op == "status":
                return client.status()
            client.stop()
            return {}
    except ServerError:
        return None


def _clean_stale(sock: Path) -> bool:
    """Remove a socket no server holds the lock of; True when removed."""
    import fcntl

    lock = sock.with_suffix(".lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False  # a server holds it: it is starting or busy, not stale
    try:
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        return True
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- status / stop


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _describe(st: dict[str, Any]) -> str:
    pre = st.get("preprocess") or {}
    pre_text = ", ".join(f"{k} {v}" for k, v in pre.items() if v is not None)
    lines = [
        ", ".join(st.get("sockets") or [str(st.get("socket"))]),
        f"  pid {st.get('pid')}, up {_duration(st.get('uptime', 0))}, clipcli {st.get('clipcli_version')}"
        + (f", TCP {st['tcp']}" if st.get("tcp") else "")
        + (f", idle timeout {st['idle_timeout']:g} s" if st.get("idle_timeout") else ""),
        f"  model {st.get('model')}" + (f" (revision {st['revision']})" if st.get("revision") else "")
        + f", device {st.get('device')} ({st.get('device_asked')} asked), dtype {st.get('dtype')}",
        f"  feature {st.get('feature')}, normalize {'yes' if st.get('normalize') else 'no'}, preprocessing: {pre_text}",
        f"  requests {st.get('requests')} served ({st.get('inputs')} inputs), {st.get('active')} running, "
        f"queue {st.get('queue')}, {st.get('forward_passes')} forward passes ({st.get('merged_passes')} merged)",
    ]
    return "\n".join(lines)


@app.command("status")
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list (for scripts).")] = False,
) -> None:
    """Show the servers running for this user: model, device, uptime, requests served, queue.

    Exit status 3 when none runs.
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
            if _ask(sock, "stop") is None:
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
        st = _ask(sock, "status")
        if st is None:
            _clean_stale(sock)
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

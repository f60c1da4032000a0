"""Running a clipcli server: checks before the model load, the lock, the foreground loop, --detach.

``clipcli serve`` (:mod:`clipcli.cli.serve_cmd`) parses flags and calls :func:`run_serve`;
the server itself is the library's (:mod:`clipcli.serve.server`). Nothing here imports torch
until a server actually starts in this process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from clipcli.cli.common import EXIT_MODEL, EXIT_OK, Reporter
from clipcli.errors import OutputLockedError, UsageError

START_TIMEOUT = 600.0  # --detach: how long the model may take to load
MIN_TOKEN = 16


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
    try:
        lock_fds = [_acquire_lock(where["lock"], where["socket"])]
    except OutputLockedError:
        conflict = _listener_conflict(where, ask(where["socket"], "hello"))
        if conflict is not None:
            raise conflict from None
        raise
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
    """Command-line flags that reproduce the key settings in a child process (started in /:
    a local model goes by its absolute path)."""
    from clipcli.serve.protocol import model_identity

    s = settings
    args = ["--model", model_identity(s.model), "--device", s.device, "--dtype", s.dtype, "--feature", s.feature,
            "--normalize" if s.normalize else "--no-normalize", "--batch-size", str(s.batch_size),
            "--preprocess", s.preprocess, "--workers", str(s.workers), "--quantize", s.quantize or "none",
            "--fast-decode" if s.fast_decode else "--no-fast-decode", "--compile" if s.compile else "--no-compile"]
    if s.revision:
        args += ["--revision", s.revision]
    for name, flag in (("resize", "--resize"), ("crop_size", "--crop-size"), ("resample", "--resample")):
        if getattr(s, name) is not None:
            args += [flag, str(getattr(s, name))]
    for name in ("mean", "std"):
        if getattr(s, name) is not None:
            args += [f"--{name}", ",".join(repr(float(v)) for v in getattr(s, name))]
    return args


# The detached child runs `python -P` (no working directory on sys.path) from /, with the
# directory this clipcli was imported from first on its path: it imports this very clipcli,
# never a clipcli/ folder that happens to be in the directory `serve --detach` was run from.
_CHILD_BOOT = (
    "import sys; root = sys.argv.pop(1); root in sys.path or sys.path.insert(0, root); "
    "sys.argv[0] = 'clipcli'; from clipcli.cli import main; main()"
)


def child_command(args: list[str]) -> list[str]:
    """The command line of a child ``clipcli`` that imports the same package as this process."""
    import clipcli

    root = str(Path(clipcli.__file__).resolve().parent.parent)
    return [sys.executable, "-P", "-c", _CHILD_BOOT, root, *args]


def _same_listener(running: str | None, wanted: tuple[str, int]) -> bool:
    """Whether a server's TCP listener (``HOST:PORT`` from its status) is the one asked for
    (port 0: any port)."""
    import socket

    if not running:
        return False
    host, _, port = running.rpartition(":")

    def resolved(name: str) -> set[str]:
        try:
            return {info[4][0] for info in socket.getaddrinfo(name.strip("[]"), None, type=socket.SOCK_STREAM)}
        except OSError:
            return {name}

    return (wanted[1] == 0 or str(wanted[1]) == port) and bool(resolved(host) & resolved(wanted[0]))


def _listener_conflict(where: dict[str, Any], info: dict[str, Any] | None) -> OutputLockedError | None:
    """The error for a server of these settings that runs without the TCP listener asked for."""
    if where["tcp"] is None or info is None:
        return None
    status = info.get("status") or info
    tcp = status.get("tcp")
    if _same_listener(tcp, where["tcp"]):
        return None
    now = f"with TCP on {tcp} only, not on {where['listen']}" if tcp else f"on the Unix socket {where['socket']} only"
    return OutputLockedError(
        f"a clipcli server for these settings is already running (pid {info.get('pid')}) {now}; "
        f"to serve TCP restart it: `clipcli serve stop` (with the same model options to stop only that one), "
        f"then `clipcli serve --detach --listen {where['listen']}`"
    )


def _detach(settings: Any, where: dict[str, Any], reporter: Reporter, *, idle_timeout: float) -> int:
    from clipcli.serve.client import Client, ServerError, Target
    from clipcli.serve.protocol import TOKEN_ENV

    sock: Path = where["socket"]
    running = ask(sock, "hello")
    if running is not None and (running.get("keys") or {}).get("image") == where["keys"]["image"]:
        conflict = _listener_conflict(where, running)
        if conflict is not None:
            raise conflict
        if not reporter.quiet:
            reporter._line(
                f"a clipcli server for these settings is already running (pid {running.get('pid')}, socket {sock})"
            )
        return EXIT_OK
    args = child_command(["serve", *_flags_for(settings), "--idle-timeout", repr(float(idle_timeout))])
    if where["listen"]:
        args += ["--listen", where["listen"]]
    if reporter.verbose:
        args.append("--verbose")
    from clipcli.serve.protocol import RUNTIME_ENV

    env = dict(os.environ)
    env[RUNTIME_ENV] = str(Path(where["directory"]).absolute())  # the child runs in /
    if env.get("CLIPCLI_CONFIG"):
        env["CLIPCLI_CONFIG"] = os.path.abspath(env["CLIPCLI_CONFIG"])
    if where["token"]:
        env[TOKEN_ENV] = where["token"]  # not on the command line: argv is visible to everyone
    log_file: Path = where["log"]
    with contextlib.suppress(FileNotFoundError):
        if log_file.is_symlink():
            log_file.unlink()
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_fd,
                                start_new_session=True, env=env, close_fds=True, cwd="/")
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


def ask(sock: Path, op: str) -> dict[str, Any] | None:
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


def clean_stale(sock: Path) -> bool:
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



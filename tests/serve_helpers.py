"""Helpers shared by the serve tests: environments, subprocess runs, waiting, raw sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from clipcli.serve import protocol

TOKEN = "test-token-0123456789abcdef"


def base_env(runtime: Path, config: Path) -> dict[str, str]:
    """This process's environment without CLIPCLI_* settings, with its own socket directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPCLI_")}
    env.update(HF_HUB_OFFLINE="1", CLIPCLI_RUNTIME_DIR=str(runtime), CLIPCLI_CONFIG=str(config))
    return env


def clipcli(args: list[str], env: dict[str, str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipcli", *args], env=env, capture_output=True, text=True,
                          timeout=kwargs.pop("timeout", 120), **kwargs)


def alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def vm_rss(pid: int) -> int:
    """Resident memory of a process in bytes (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def unix_socket(path: Path, timeout: float = 10.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock


def tcp_socket(address: str, timeout: float = 10.0) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def reply_of(sock: socket.socket) -> dict:
    header, _ = protocol.recv_message(sock)
    return header

"""Running the installed `coap-auth` command as a subprocess, shared by the process tests."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

COAP_AUTH = shutil.which("coap-auth") or str(Path(sys.executable).parent / "coap-auth")


def clean_env(**settings: str) -> dict[str, str]:
    """The caller's environment without COAP_AUTH_* settings or a master key leaking in,
    plus the given settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COAP_AUTH_")}
    env.update(settings)
    return env


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_argv(data_dir: Path, port: int) -> list[str]:
    return [
        COAP_AUTH,
        "serve",
        "--data-dir",
        str(data_dir),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
    ]

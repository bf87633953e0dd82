"""File modes of the data directory (issue 13): on every start, also of a directory an older
version (or a restore) left open, the directory is 0700 and the database, its -wal and -shm
and the master key are 0600, whatever the caller's umask.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import subprocess
from pathlib import Path

from tests.processes import CLI_TIMEOUT, COAP_AUTH, clean_env, cli_ok, serve_process

DB = "coap-auth.sqlite3"
PRIVATE_FILES = ("master.key", DB, DB + "-wal", DB + "-shm")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _modes(data_dir: Path) -> dict[str, int]:
    modes = {".": _mode(data_dir)}
    modes.update(
        {name: _mode(data_dir / name) for name in PRIVATE_FILES if (data_dir / name).exists()}
    )
    return modes


def _open_umask() -> None:
    os.umask(0o022)


def test_a_new_data_dir_is_private_under_an_open_umask(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    result = subprocess.run(
        [COAP_AUTH, "init", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=clean_env(),
        preexec_fn=_open_umask,
    )
    assert result.returncode == 0, result.stderr
    assert _modes(data_dir) == {".": 0o700, "master.key": 0o600, DB: 0o600}


async def test_an_open_data_dir_is_made_private_on_every_start(tmp_path: Path) -> None:
    """A data directory from before: 0755, its files 0644, a -wal and -shm left 0644 by a
    reader that holds the database open. `serve` fixes every one of them as it starts."""
    data_dir = tmp_path / "data"
    cli_ok("init", data_dir=data_dir)
    with contextlib.closing(sqlite3.connect(data_dir / DB)) as reader:
        reader.execute("SELECT count(*) FROM signing_keys").fetchall()  # opens -wal and -shm
        data_dir.chmod(0o755)
        for name in PRIVATE_FILES:
            (data_dir / name).chmod(0o644)
        assert _modes(data_dir) == {".": 0o755, **dict.fromkeys(PRIVATE_FILES, 0o644)}

        async with serve_process(data_dir, tmp_path / "serve.log"):
            assert _modes(data_dir) == {".": 0o700, **dict.fromkeys(PRIVATE_FILES, 0o600)}


def test_any_command_makes_an_open_data_dir_private(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    cli_ok("init", data_dir=data_dir)
    data_dir.chmod(0o755)
    for name in ("master.key", DB):
        (data_dir / name).chmod(0o644)

    cli_ok("clients", "list", data_dir=data_dir)

    assert _modes(data_dir) == {".": 0o700, "master.key": 0o600, DB: 0o600}

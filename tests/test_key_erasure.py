"""A revoked key's sealed private part does not linger on disk (issue 13): once `keys revoke`
returns, its bytes are in no file of the data directory, not in the SQLite write-ahead log nor in
the free space of the database pages, even while a server holds the database open (so the log
is not removed when the CLI closes it).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from pathlib import Path

from tests.processes import cli_ok, serve_process

DB = "coap-auth.sqlite3"


def _sealed_private_key(data_dir: Path, kid: str) -> bytes:
    with contextlib.closing(sqlite3.connect(data_dir / DB)) as conn:
        (sealed,) = conn.execute(
            "SELECT private_key FROM signing_keys WHERE kid = ?", (bytes.fromhex(kid),)
        ).fetchone()
    assert isinstance(sealed, bytes) and len(sealed) > 64
    return sealed


def _next_kid(data_dir: Path) -> str:
    keys = json.loads(cli_ok("keys", "list", "--json", data_dir=data_dir))
    (kid,) = [k["kid"] for k in keys if k["state"] == "next"]
    return kid


def _files_holding(data_dir: Path, sealed: bytes) -> list[str]:
    """Files holding the sealed key, or its GCM tag or its nonce and first ciphertext bytes
    (a copy split across pages still shows one of them)."""
    pieces = (sealed, sealed[-16:], sealed[:24])
    return [
        path.name
        for path in sorted(data_dir.iterdir())
        if path.is_file() and any(piece in path.read_bytes() for piece in pieces)
    ]


async def test_a_revoked_keys_sealed_private_part_is_in_no_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    cli_ok("init", data_dir=data_dir)
    # A rotation rewrites the key rows: older copies of the sealed key in pages and log too.
    cli_ok("keys", "rotate", "--force", data_dir=data_dir)
    kid = _next_kid(data_dir)
    sealed = _sealed_private_key(data_dir, kid)
    assert _files_holding(data_dir, sealed) != [], "the check cannot see the key at all"

    async with serve_process(data_dir, tmp_path / "serve.log"):
        cli_ok("keys", "revoke", kid, data_dir=data_dir)

        assert _files_holding(data_dir, sealed) == []

"""A data directory names one ledger: `coordinator serve --db URL` records URL there (0600), and
every command given only the directory opens that database."""

from __future__ import annotations

import stat

import pytest

from ledger.db import URL_FILE, remember_url, remembered_url, resolve_url
from ledger.errors import LedgerError

PG = "postgresql://meshpool:secret@db.example:5432/meshpool"


def test_the_recorded_url_is_private_and_wins_over_the_default(tmp_path):
    assert resolve_url(None, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'ledger.db'}"
    assert remembered_url(tmp_path) is None
    remember_url(tmp_path, PG)
    path = tmp_path / URL_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it may hold a password
    assert resolve_url(None, tmp_path) == "postgresql+psycopg://meshpool:secret@db.example:5432/meshpool"
    assert resolve_url("other.db", tmp_path).endswith("/other.db")  # --db still says where
    remember_url(tmp_path, "sqlite:///x.db")  # a later serve --db replaces it
    assert resolve_url(None, tmp_path) == "sqlite:///x.db" and not list(tmp_path.glob(".ledger.url.*"))
    path.write_text("not a url\n")
    with pytest.raises(LedgerError, match="ledger.url"):
        resolve_url(None, tmp_path)

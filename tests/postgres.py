"""A fresh PostgreSQL schema of the test server for one test (scripts/test.sh starts the server)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import pytest
from sqlalchemy import create_engine, text

from ledger.db import resolve_url

PG_ENV = "MESHPOOL_TEST_POSTGRES_URL"


@contextmanager
def empty_schema_url(what: str) -> Iterator[str]:
    """A `--db` URL for an empty schema (search_path in the URL), dropped afterwards; skips the test
    with the reason when no server is configured."""
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{what} needs PostgreSQL: set {PG_ENV} (scripts/postgres.sh prints a URL)")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(resolve_url(base))
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{base}{'&' if '?' in base else '?'}options={quote(f'-csearch_path={schema}')}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()

"""Engines: SQLite (default, DATA_DIR/ledger.db, WAL) or PostgreSQL (`postgresql://…`, via psycopg 3).

A data directory names one ledger: `coordinator serve --db URL` records URL in DATA_DIR/ledger.url
(mode 0600: it may hold a password), and every command given only `--data-dir` (`coordinator
consumer add`, `ledger …`) opens that database rather than DATA_DIR/ledger.db.

SQLite writers must take the write lock when their transaction begins, not at their first write,
or two writers that both read first deadlock into SQLITE_BUSY. pysqlite's own transaction handling
is switched off and every transaction starts with BEGIN IMMEDIATE (the recipe in SQLAlchemy's
SQLite dialect docs, "Serializable isolation / Savepoints / Transactional DDL"). Readers use a
plain deferred BEGIN, which in WAL mode reads a snapshot while the coordinator writes.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine

from ledger.errors import LedgerError

DB_FILE = "ledger.db"
URL_FILE = "ledger.url"
MAX_URL_CHARS = 4096
SQLITE_BUSY_TIMEOUT_MS = 30_000


def default_data_dir() -> Path:
    return Path(os.environ.get("MESHPOOL_DATA_DIR", Path.home() / ".meshpool"))


def resolve_url(db: str | None = None, data_dir: str | os.PathLike[str] | None = None) -> str:
    """A SQLAlchemy URL from `--db` (URL or file path), else the one DATA_DIR/ledger.url records,
    else DATA_DIR/ledger.db (`data_dir` None: $MESHPOOL_DATA_DIR or ~/.meshpool)."""
    if db:
        if db.startswith(("postgresql://", "postgres://")):
            return "postgresql+psycopg://" + db.split("://", 1)[1]
        if "://" in db:
            return db
        return f"sqlite:///{Path(db).resolve()}"
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    return remembered_url(directory) or f"sqlite:///{(directory / DB_FILE).resolve()}"


def remembered_url(data_dir: str | os.PathLike[str]) -> str | None:
    """The database URL that `coordinator serve --db` recorded in `data_dir`, if any."""
    path = Path(data_dir) / URL_FILE
    try:
        text = path.read_text()[:MAX_URL_CHARS + 1].strip()
    except FileNotFoundError:
        return None
    if "://" not in text or len(text) > MAX_URL_CHARS or "\n" in text:
        raise LedgerError(f"{path} does not hold one database URL; remove it or run `coordinator serve --db URL`")
    return text


def remember_url(data_dir: str | os.PathLike[str], db: str) -> str:
    """Record `--db` in DATA_DIR/ledger.url (created 0600, replaced atomically); returns the URL."""
    url = resolve_url(db)
    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{URL_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only narrow the mode; an old file may have had another
        os.write(fd, (url + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / URL_FILE)
    return url


def make_engine(url: str, *, writer: bool = True, sqlite_synchronous: str = "FULL") -> Engine:
    """An engine for the ledger; `writer=False` gives readers deferred (snapshot) transactions."""
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _sqlite_hooks(engine, writer, sqlite_synchronous)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def _sqlite_hooks(engine: Engine, writer: bool, synchronous: str) -> None:
    if synchronous not in ("FULL", "NORMAL"):
        raise ValueError("sqlite_synchronous must be FULL or NORMAL")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        mode = cursor.execute("PRAGMA journal_mode").fetchone()[0]
        if mode.lower() != "wal" and writer:
            cursor.execute("PRAGMA journal_mode = WAL")
        # FULL: a committed settlement survives power loss, not only a killed process.
        cursor.execute(f"PRAGMA synchronous = {synchronous}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"

"""`ledger` console script: auditor commands over a ledger database, read-only.

    ledger verify  [--db URL | --data-dir DIR] [--public-key HEX]   exit 0 if the log checks, 1 naming the first bad entry
    ledger account ID [--recent N]                                   balance, stake, reputation, recent entries (JSON)
    ledger tx OP_ID                                                  an operation's entries and receipts (JSON)
    ledger supply                                                    minted, burned, balances, escrow, head (JSON)
    ledger export                                                    every entry, receipt, checkpoint (JSON lines)
    ledger checkpoints                                               signed tree heads (JSON lines)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ledger.db import make_engine, resolve_url
from ledger.errors import LedgerError
from ledger.reader import LedgerReader
from ledger.verify import verify


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ledger", description="Audit a meshpool credit ledger (read-only).")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        where = p.add_mutually_exclusive_group()
        where.add_argument("--db", help="database URL (postgresql://…, sqlite:///…) or SQLite file path")
        where.add_argument("--data-dir", help="use DATA_DIR/ledger.db (default $MESHPOOL_DATA_DIR or ~/.meshpool)")
        return p

    p = command("verify", "replay the log from genesis and check every hash, signature and invariant")
    p.add_argument("--public-key", help="pin the coordinator's Ed25519 public key (hex)")
    p = command("account", "show an account")
    p.add_argument("account_id")
    p.add_argument("--recent", type=int, default=20)
    p = command("tx", "show an operation (transfer, hold, settlement, slash...) by its id")
    p.add_argument("op_id")
    command("supply", "minted, burned and the balances they must equal")
    command("export", "dump the log as JSON lines")
    command("checkpoints", "list the signed checkpoints")
    return parser


def _out(value) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    url = resolve_url(args.db, args.data_dir)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        print(f"ledger: no ledger database at {url[len('sqlite:///'):]}", file=sys.stderr)
        return 2
    try:
        if args.command == "verify":
            engine = make_engine(url, writer=False)
            started = time.monotonic()
            report = verify(engine, expected_public_key=args.public_key)
            elapsed_ms = int((time.monotonic() - started) * 1000)
            if not report.ok:
                where = f"entry {report.first_bad_seq}" if report.first_bad_seq is not None else "stored state"
                print(f"ledger verify: FAILED at {where}: {report.error}", file=sys.stderr)
                return 1
            print(f"ledger verify: OK: {report.entry_count} entries, {report.checkpoints_checked} checkpoints, "
                  f"{report.accounts} accounts, {report.open_holds} open holds, supply "
                  f"{report.minted_units - report.burned_units} units, head {report.head_hash}, "
                  f"tree root {report.tree_root}, coordinator key {report.public_key} ({elapsed_ms} ms)")
            return 0
        reader = LedgerReader.open(args.db, args.data_dir)
        if args.command == "account":
            _out(reader.account(args.account_id, args.recent))
        elif args.command == "tx":
            found = reader.op(args.op_id)
            if found is None:
                print(f"ledger: no operation {args.op_id!r}", file=sys.stderr)
                return 1
            _out(found)
        elif args.command == "supply":
            _out(reader.supply())
        elif args.command == "export":
            for record in reader.export():
                sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
        elif args.command == "checkpoints":
            for record in reader.checkpoints(limit=1000):
                sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
    except LedgerError as exc:
        print(f"ledger: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

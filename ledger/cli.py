"""`ledger` console script: auditor commands over a ledger database, read-only.

    ledger verify  [--db URL | --data-dir DIR] [--public-key HEX]   exit 0 if the log checks, 1 naming the first bad entry
    ledger account ID [--recent N]                                   balance, stake, reputation, recent entries
    ledger tx OP_ID                                                  an operation's entries and receipts
    ledger supply                                                    minted, burned, balances, escrow, head
    ledger export                                                    every entry, receipt, checkpoint (JSON lines)
    ledger checkpoints                                               signed tree heads

`account`, `tx`, `supply` and `checkpoints` print readable tables; with `--json` they print JSON
(`checkpoints --json`: one JSON object a line) for scripts. `export` is always JSON lines.
"""

from __future__ import annotations

import argparse
import dataclasses
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
        where.add_argument("--data-dir", help="the ledger of a coordinator's data directory: the database "
                           "`coordinator serve --db` recorded there, else DATA_DIR/ledger.db "
                           "(default $MESHPOOL_DATA_DIR or ~/.meshpool)")
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
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


def _show(args, value, as_table) -> None:
    if args.json:
        _out(value)
    else:
        as_table(value)


# -- tables -------------------------------------------------------------------------------

MAX_CELL = 72


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (dict, list)):
        value = json.dumps(value, sort_keys=True, separators=(",", ":"))
    text = str(value).replace("\n", " ")
    return text if len(text) <= MAX_CELL else text[:MAX_CELL - 1] + "…"


def _table(headers: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(v.rjust(w) if i in numeric else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _pairs(items: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in items)
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in items)


def _when(ts_ms) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts_ms / 1000)) if ts_ms else "-"


def _entries_table(rows: list[dict]) -> str:
    return _table(["seq", "time (UTC)", "op", "kind", "debit", "credit", "amount", "ref", "note"],
                  [[e["seq"], _when(e["ts_ms"]), e["op_id"], e["kind"], e["debit"], e["credit"], e["amount_units"],
                    e["ref"], _note(e.get("meta") or {})] for e in rows], numeric={0, 6})


def _note(meta: dict) -> str:
    """The part of an entry's meta a reader wants in a table: a reason, a role, a memo or a verdict."""
    if "subject_passed" in meta:
        return f"audit of {meta.get('subject')}: {'passed' if meta['subject_passed'] else 'failed'}"
    for key in ("reason", "role", "memo", "outcome"):
        if meta.get(key):
            return str(meta[key])
    return ""


def _print_account(a: dict) -> None:
    print(_pairs([("account", a["id"]), ("kind", a["kind"]), ("balance", a["balance_units"]),
                  ("stake", a["stake_units"]), ("slashed", a["slashed_units"]), ("reputation", a["reputation"]),
                  ("audits agreed", a["audits_agreed"]), ("audits disagreed", a["audits_disagreed"]),
                  ("audits passed", a["audits_passed"]), ("slashes", a["slash_count"]), ("banned", a["banned"]),
                  ("contradicted claims", a["misconduct_count"]), ("may serve", a["may_serve"]), ("public key", a["public_key"])]))
    print(f"\nrecent entries ({len(a['recent_entries'])})")
    print(_entries_table(a["recent_entries"]))


def _print_op(op: dict) -> None:
    print(f"operation {op['op_id']}: {len(op['entries'])} entries")
    print(_entries_table(op["entries"]))
    if op["receipts"]:
        print(f"\nreceipts ({len(op['receipts'])})")
        print(_table(["provider", "layers", "tokens", "request", "model"],
                     [[r.get("provider_id"), f"[{r.get('layer_start')}, {r.get('layer_end')})", r.get("token_count"),
                       r.get("request_id"), r.get("model")] for r in op["receipts"]], numeric={2}))
    if op["hold"]:
        h = op["hold"]
        print("\nhold")
        print(_pairs([("account", h.get("account_id")), ("request", h.get("request_id")),
                      ("amount", h.get("amount_units")), ("released", h.get("released_units")),
                      ("paid", h.get("paid_units")), ("status", h.get("status"))]))


def _print_supply(s: dict) -> None:
    print(_pairs([("minted", s["minted_units"]), ("burned", s["burned_units"]), ("supply", s["supply_units"]),
                  ("sum of balances", s["sum_of_balances_units"]), ("escrow (requests)", s["escrow_requests_units"]),
                  ("escrow (stakes)", s["escrow_stakes_units"]), ("open holds", s["open_holds"]),
                  ("entries", s["entry_count"]), ("head hash", s["head_hash"]), ("tree root", s["tree_root"])]))


def _print_checkpoints(rows: list[dict]) -> None:
    print(_table(["entries", "time (UTC)", "tree root", "head hash"],
                 [[c["entry_count"], _when(c["ts_ms"]), c["tree_root"], c["head_hash"]] for c in rows], numeric={0}))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        url = resolve_url(args.db, args.data_dir)
    except LedgerError as exc:
        print(f"ledger: {exc}", file=sys.stderr)
        return 2
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        print(f"ledger: no ledger database at {url[len('sqlite:///'):]}", file=sys.stderr)
        return 2
    try:
        if args.command == "verify":
            engine = make_engine(url, writer=False)
            started = time.monotonic()
            report = verify(engine, expected_public_key=args.public_key)
            elapsed_ms = int((time.monotonic() - started) * 1000)
            if args.json:
                _out({**dataclasses.asdict(report), "elapsed_ms": elapsed_ms})
                return 0 if report.ok else 1
            if not report.ok:
                where = f"entry {report.first_bad_seq}" if report.first_bad_seq is not None else "stored state"
                print(f"ledger verify: FAILED at {where}: {report.error}", file=sys.stderr)
                return 1
            print(f"ledger verify: OK: {report.entry_count} entries, {report.checkpoints_checked} checkpoints, "
                  f"{report.accounts} accounts, {report.open_holds} open holds, supply "
                  f"{report.minted_units - report.burned_units} units, head {report.head_hash}, "
                  f"tree root {report.tree_root}, coordinator key {report.public_key} ({elapsed_ms} ms)")
            return 0
        reader = LedgerReader.open(url)
        if args.command == "account":
            _show(args, reader.account(args.account_id, args.recent), _print_account)
        elif args.command == "tx":
            found = reader.op(args.op_id)
            if found is None:
                print(f"ledger: no operation {args.op_id!r}", file=sys.stderr)
                return 1
            _show(args, found, _print_op)
        elif args.command == "supply":
            _show(args, reader.supply(), _print_supply)
        elif args.command == "export":
            for record in reader.export():
                sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
        elif args.command == "checkpoints":
            found = reader.checkpoints(limit=1000)
            if args.json:
                for record in found:
                    sys.stdout.write(json.dumps(record, sort_keys=True) + "\n")
            else:
                _print_checkpoints(found)
    except LedgerError as exc:
        print(f"ledger: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`coordinator` command line: run the coordinator, vouch for providers."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="coordinator", description="Run a meshpool coordinator.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the libp2p host, the pool and the HTTP API")
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--p2p-port", type=int, default=0, help="0: any free port")
    p.add_argument("--p2p-host", default="127.0.0.1",
                   help="address libp2p listens on and announces (a public host: its public or LAN address)")
    p.add_argument("--api-host", default="127.0.0.1", help="address the consumer API and dashboard listen on")
    p.add_argument("--api-port", type=int, default=0, help="0: any free port")
    p.add_argument("--model", type=Path, help="Hugging Face-format model directory (default: the shipped model)")
    p.add_argument("--max-sessions", type=int, default=8, help="sessions each stage holds at once")
    p.add_argument("--microbatches", type=int, default=2,
                   help="steps each pipeline keeps in flight (at most one per stage; stages on one GPU count "
                        "once), so every stage works while the others do")
    p.add_argument("--context-tokens", type=int, default=1024, help="KV cache per session, in tokens")
    p.add_argument("--heartbeat-timeout-s", type=float, default=5.0)
    p.add_argument("--step-timeout-s", type=float, default=30.0,
                   help="a pipeline step with no result in this long fails the pipeline (its requests are replayed)")
    p.add_argument("--rate-limit-rps", type=float, default=10.0, help="requests a second per API key (0: no limit)")
    p.add_argument("--db", help="ledger database URL (postgresql://...), recorded in DATA_DIR/ledger.url for the "
                   "commands given only --data-dir (default: the one recorded there, else sqlite DATA_DIR/ledger.db)")
    p.add_argument("--audit-probability-ppm", type=int,
                   help="a new ledger's audit probability per (request, stage), in parts per million")
    p.add_argument("--promotion-audits", type=int,
                   help="a new ledger's K: agreeing audits a newcomer needs before it may serve")
    p.add_argument("--referee-check-ppm", type=int, default=200_000,
                   help="share of agreeing verdicts from serving verifiers that the coordinator re-checks")
    p.add_argument("--serving-dtype", choices=("float32", "bfloat16"), default="",  # wire.messages.SERVING_DTYPES
                   help="the precision every stage serves in (default: each provider's own --dtype where audits "
                        "can verify it: bfloat16 needs two other live providers of its hardware class; else float32)")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=_serve)

    p = sub.add_parser("vouch", help="let a provider serve: the coordinator locks an operator-funded stake for it "
                       "(works while the coordinator runs)")
    p.add_argument("peer")
    p.add_argument("--data-dir", required=True, type=Path)
    p.set_defaults(func=_vouch)

    p = sub.add_parser("consumer", help="consumer accounts (work while the coordinator runs)")
    consumer = p.add_subparsers(dest="consumer_command", required=True)
    p = consumer.add_parser("add", help="open a consumer account with credits; prints its API key last")
    p.add_argument("name")
    p.add_argument("--credits", required=True, type=int, help="credit units to mint into the account")
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--db", help="ledger database URL (default: the one `serve --db` recorded in DATA_DIR, "
                   "else sqlite DATA_DIR/ledger.db)")
    p.set_defaults(func=_consumer_add)

    p = sub.add_parser("demo", help="a local pool of several providers on the default model")
    p.add_argument("--dir", type=Path, help="where the pool's data and logs go (default: a new temp dir)")
    p.add_argument("--once", action="store_true", help="stop after the example request")
    p.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    return args.func(args)


def _serve(args) -> int:
    from contracts import DEFAULT_PARAMS, ContractError, MoneyParams
    from coordinator.server import serve
    from ledger.errors import LedgerError
    from node.config import ModelError
    from node.cpu_threads import serve_switch_interval
    from node.transport.instance import AlreadyServing, InstanceLock

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    serve_switch_interval()
    if args.microbatches < 1 or args.max_sessions < 1:
        print("coordinator: --microbatches and --max-sessions must be at least 1", file=sys.stderr)
        return 2
    try:  # one coordinator per data directory: its key, its ledger (a restart after kill -9 finds it free)
        lock = InstanceLock(args.data_dir).acquire()  # noqa: F841 - held until the process ends
    except AlreadyServing as exc:
        print(f"coordinator: {exc}", file=sys.stderr)
        return 1
    changes = {name: value for name, value in (("audit_probability_ppm", args.audit_probability_ppm),
                                               ("promotion_agreements", args.promotion_audits)) if value is not None}
    try:
        params = MoneyParams(**{**DEFAULT_PARAMS.to_dict(), **changes}) if changes else None
        serve(args.data_dir, args.model, args.p2p_port, args.api_port, host=args.api_host, p2p_host=args.p2p_host,
              max_sessions=args.max_sessions,
              context_tokens=args.context_tokens, heartbeat_timeout_s=args.heartbeat_timeout_s,
              step_timeout_s=args.step_timeout_s,
              rate_limit_rps=args.rate_limit_rps, db=args.db, params=params,
              referee_check_ppm=args.referee_check_ppm, serving_dtype=args.serving_dtype,
              microbatches=args.microbatches)
    except (ModelError, ContractError, LedgerError) as exc:
        print(f"coordinator: {exc}", file=sys.stderr)
        return 2
    return 0


def _demo(args) -> int:
    from coordinator.demo import run_demo

    return run_demo(args.dir, args.once)


def _consumer_add(args) -> int:
    from sqlalchemy.exc import DBAPIError

    from coordinator.accounts import Accounts, ConsumerExists
    from ledger.errors import LedgerError

    if args.credits < 0:
        print("coordinator: --credits must be >= 0", file=sys.stderr)
        return 2
    try:
        accounts = Accounts(args.data_dir, db=args.db)
    except (LedgerError, DBAPIError) as exc:
        print(f"coordinator: cannot open the ledger: {exc}", file=sys.stderr)
        return 2
    try:
        key = accounts.add_consumer(args.name, args.credits)
        account_id = accounts.lookup(key).account_id
    except (ConsumerExists, ValueError, LedgerError) as exc:
        print(f"coordinator: {exc}", file=sys.stderr)
        return 2
    finally:
        accounts.close()
    # the public ledger knows the account only by this pseudonym, never by the name
    print(f"consumer {args.name}: account {account_id} with {args.credits} credit units; API key:")
    print(key)
    return 0


def _vouch(args) -> int:
    from libp2p.peer.id import ID

    from coordinator.registry import add_vouch

    try:
        raw = ID.from_base58(args.peer).to_bytes()
    except Exception:  # the base58 decoder raises several types
        raw = b""
    # a peer id is a multihash: identity (0x00) of a small public key, or sha2-256 (0x12) of a large one
    valid = len(raw) > 2 and raw[0] in (0x00, 0x12) and raw[1] == len(raw) - 2
    if not valid:
        print(f"coordinator: {args.peer!r} is not a libp2p peer id", file=sys.stderr)
        return 2
    added = add_vouch(args.data_dir, args.peer)
    print(f"vouched for {args.peer}" if added else f"{args.peer} was already vouched for")
    stake = _required_stake(args.data_dir)
    amount = f"{stake} units of stake" if stake is not None else "the required stake"
    print(f"the coordinator locks {amount} for it, funded by the operator, once (op stake:vouch:{args.peer} "
          f"in the ledger), as soon as it has registered")
    return 0


def _required_stake(data_dir: Path) -> int | None:
    """The stake a provider needs in this data directory's ledger, if there is one to read."""
    from contracts.stakes import required_stake_units
    from ledger.db import remembered_url
    from ledger.reader import LedgerReader

    try:
        if remembered_url(data_dir) is None and not (data_dir / "ledger.db").exists():
            return None
        reader = LedgerReader.open(data_dir=data_dir)
        try:
            return required_stake_units(reader.params)
        finally:
            reader.engine.dispose()
    except Exception:  # a ledger that cannot be read now changes nothing of the vouch
        return None


if __name__ == "__main__":
    sys.exit(main())

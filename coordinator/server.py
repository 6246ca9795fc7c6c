"""`coordinator serve`: the libp2p host, the registry, the pool and the HTTP API in one process.

Threads: the libp2p host runs its own trio loop; its handlers run in worker threads and call the
registry and pool, which are thread-safe; drivers and the planner have a thread each; uvicorn
serves the API on the main thread's asyncio loop.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from pathlib import Path

import uvicorn

from contracts import MoneyParams
from coordinator.accounts import Accounts
from coordinator.api import create_app
from coordinator.links import ResultBoard, StreamLink
from coordinator.planner import ModelShape, Workload, provider_spec_from_profile
from coordinator.pool import Pool
from coordinator.registry import Registry
from ledger.db import remember_url
from ledger.errors import ReceiptError
from ledger.reader import LedgerReader
from node.config import ModelConfig
from node.models import default_model_dir, model_id_of
from node.protocol import (ACCOUNT, ACCOUNT_INFO, ACK, ASSIGN, FAILED, HEARTBEAT, LEAVE, PING, PROTO_ASSIGN,
                           PROTO_CONTROL, PROTO_RESULT, RECEIPTS, REGISTER, RESULT, UNASSIGN, ack,
                           signed_profile_bytes)
from node.transport import Frame, P2PNode, Stream, StreamClosed, TransportConfig, TransportError, load_or_create
from node.transport.identity import verify_for_peer
from verification.audits import Auditor

log = logging.getLogger("meshpool.coordinator")

ASSIGN_TIMEOUT_S = 120.0
LEAVE_TIMEOUT_S = 60.0
MAX_PROFILE_BYTES = 16 * 1024


class AssignmentFailed(RuntimeError):
    def __init__(self, peer: str, reason: str):
        super().__init__(f"{peer}: {reason}")
        self.peer = peer


class Coordinator:
    def __init__(self, data_dir: Path, model_dir: Path, p2p_port: int = 0, heartbeat_timeout_s: float = 5.0,
                 max_sessions: int = 8, context_tokens: int = 1024, accounts: Accounts | None = None,
                 referee_check_ppm: int = 200_000):
        """`accounts`: consumers and the ledger; with it, stages are paid on their receipts and audited."""
        self.data_dir, self.model_dir = data_dir, model_dir
        self.config = ModelConfig.load(model_dir)
        self.model_id = model_id_of(model_dir)
        self.accounts = accounts
        self.ledger_reader = LedgerReader(accounts.reader_engine) if accounts else None
        self.registry = Registry(data_dir, heartbeat_timeout_s=heartbeat_timeout_s,
                                 **({"params": accounts.ledger.params} if accounts else {}))
        self.identity = load_or_create(data_dir)
        # a peer that sends a malformed frame is hung up on, not only its stream
        self.node = P2PNode(self.identity, TransportConfig(listen_port=p2p_port, disconnect_on_bad_frame=True))
        self.board = ResultBoard()
        self.max_sessions, self.context_tokens = max_sessions, context_tokens
        raw = json.loads((model_dir / "config.json").read_text())
        # CPU providers serve in float32: plan with 4 bytes a parameter, the larger of the two.
        shape = ModelShape.from_hf_config(raw, name=self.model_id, bytes_per_param=4.0, activation_bytes=4)
        self.pool = Pool(self.registry, shape, self.model_id, self._assign, self._unassign, self._make_link,
                         self._probe, Workload(batch=max_sessions, context_tokens=context_tokens,
                                               microbatches_in_flight=1))
        self.auditor: Auditor | None = None
        if accounts is not None:
            self.auditor = Auditor(self.node, self.identity, self.registry, accounts.ledger,
                                   self.ledger_reader, model_dir, self.config.n_layers,
                                   self.pool.request_replan, referee_check_ppm=referee_check_ppm)
            accounts.subscribe(self.auditor.consider)

    def start(self) -> str:
        self.node.set_handler(PROTO_CONTROL, self._on_control)
        self.node.set_stream_handler(PROTO_RESULT, self._on_results)
        addr = self.node.start()
        self.pool.start()
        if self.auditor is not None:
            self.auditor.start()
        return addr

    def stop(self) -> None:
        if self.auditor is not None:
            self.auditor.stop()
        self.pool.stop()
        self.node.close()

    # -- control --------------------------------------------------------------------------

    def _on_control(self, frame: Frame, peer: str) -> Frame:
        if frame.type == REGISTER.type:
            return self._register(frame, peer)
        if frame.type == HEARTBEAT.type:
            known = self.registry.heartbeat(peer)
            return ack(known, "" if known else "unknown or expired provider")
        if frame.type == LEAVE.type:
            return self._leave(peer)
        if frame.type == FAILED.type:
            if not self.board.deliver(frame, peer):
                return ack(False, "no such step in flight on a pipeline of yours")
            if frame.fields["peer"] != peer:
                self.pool.suspect(frame.fields["peer"])
            return ack()
        if frame.type == RECEIPTS.type:
            return self._receipts(frame, peer)
        if frame.type == ACCOUNT.type:
            return self._account(peer)
        return ack(False, f"unexpected {frame.type} on the control protocol")

    def _account(self, peer: str) -> Frame:
        record = self.registry.providers.get(peer)
        if record is None:
            return ack(False, "unknown provider")
        balance = reputation = 0
        if self.ledger_reader is not None:
            balance = self.ledger_reader.balance_units(peer)
            standing = self.ledger_reader.standing(peer)
            reputation = standing.reputation if standing else 0
        return Frame(ACCOUNT_INFO.type, ACCOUNT_INFO.version,
                     {"state": record.state, "balance_units": balance, "reputation": reputation})

    def _receipts(self, frame: Frame, peer: str) -> Frame:
        if self.accounts is None or peer not in self.registry.providers:
            return ack(False, "receipts are taken from registered providers of a paying pool")
        try:
            for data in frame.fields["receipts"][:64]:
                self.accounts.receipts.add(data, peer)
        except ReceiptError as exc:
            log.warning("receipt from %s refused: %s", peer, exc)
            return ack(False, f"receipt refused: {exc}")
        return ack()

    def _register(self, frame: Frame, peer: str) -> Frame:
        f = frame.fields
        body = signed_profile_bytes(peer, f["profile"], f["addrs"], f["max_memory_bytes"])
        if len(body) > MAX_PROFILE_BYTES:
            return ack(False, f"profile over {MAX_PROFILE_BYTES} bytes")
        if not verify_for_peer(peer, f["public_key"], body, f["signature"]):
            log.warning("registration from %s with a bad signature refused", peer)
            return ack(False, "the profile's signature does not match the peer id")
        if f["max_memory_bytes"] <= 0 or not all(isinstance(a, str) for a in f["addrs"]):
            return ack(False, "bad max_memory_bytes or addrs")
        try:
            provider_spec_from_profile(peer, f["profile"], f["max_memory_bytes"] // 2**20)
        except ValueError as exc:  # ProfileError is a ValueError
            return ack(False, f"bad profile: {exc}")
        if self.accounts is not None:
            # its ledger account (receipts must carry this key) and the standing it earned before
            self.accounts.open_provider(peer, f["public_key"])
            standing = self.ledger_reader.standing(peer)
            if standing is not None:
                self.registry.set_standing(peer, standing)
        try:
            record = self.registry.register(peer, f["profile"], f["addrs"], f["max_memory_bytes"])
        except ValueError as exc:
            return ack(False, str(exc))
        log.info("provider %s registered (%s)", peer, record.state)
        self.pool.request_replan()
        return ack()

    def _leave(self, peer: str) -> Frame:
        """Move the provider's work elsewhere, then let it go."""
        if peer not in self.registry.providers:
            return ack(False, "unknown provider")
        self.registry.set_state(peer, "leaving", "left")
        self.pool.request_replan()
        done = threading.Event()

        def wait_free():
            while not done.is_set():
                if not any(peer in a.pipeline.peer_ids for a in list(self.pool.active.values())):
                    done.set()
                    return
                done.wait(0.1)

        threading.Thread(target=wait_free, daemon=True).start()
        freed = done.wait(LEAVE_TIMEOUT_S)
        done.set()
        self.registry.set_state(peer, "dead", "left")
        return ack(freed, "" if freed else "still assigned after the timeout")

    # -- data path ------------------------------------------------------------------------

    def _on_results(self, stream: Stream) -> None:
        """Sampled tokens from the last stage of a pipeline, until the stream ends."""
        while True:
            try:
                frame = stream.recv(timeout_s=3600.0)
            except StreamClosed:
                return
            if frame.type != RESULT.type:
                log.warning("unexpected %s from %s on the result stream", frame.type, stream.peer_id)
                continue
            self.board.deliver(frame, stream.peer_id)

    def _make_link(self, pipeline: str, stage_peers: tuple[str, ...]) -> StreamLink:
        return StreamLink(self.node, pipeline, stage_peers, self.board)

    def _assign(self, peer: str, fields: dict) -> None:
        nxt = fields["next_peer"] or self.node.peer_id
        addrs = [self.node.addr] if nxt == self.node.peer_id else self.registry.providers[nxt].addrs
        frame = Frame(ASSIGN.type, ASSIGN.version, {**fields, "prev_peer": fields["prev_peer"] or self.node.peer_id,
                                                    "next_peer": nxt, "next_addrs": addrs,
                                                    "max_sessions": self.max_sessions,
                                                    "max_seq_len": self.context_tokens})
        try:
            reply = self.node.request(peer, PROTO_ASSIGN, frame, timeout_s=ASSIGN_TIMEOUT_S)
        except TransportError as exc:
            raise AssignmentFailed(peer, f"unreachable: {exc}") from exc
        if reply.type != ACK.type or not reply.fields.get("ok"):
            raise AssignmentFailed(peer, reply.fields.get("reason", reply.type))

    def _unassign(self, peer: str, pipeline: str) -> None:
        try:
            self.node.request(peer, PROTO_ASSIGN, Frame(UNASSIGN.type, UNASSIGN.version, {"pipeline": pipeline}),
                              timeout_s=10.0)
        except TransportError as exc:
            log.info("unassign %s: %s", peer, exc)

    def _probe(self, peer: str) -> bool:
        try:
            reply = self.node.request(peer, PROTO_ASSIGN, Frame(PING.type, PING.version, {}), timeout_s=2.0)
            return reply.type == ACK.type
        except TransportError:
            return False


def serve(data_dir: Path, model_dir: Path | None, p2p_port: int, api_port: int, host: str = "127.0.0.1",
          rate_limit_rps: float = 10.0, db: str | None = None, params: MoneyParams | None = None,
          **coordinator_kwargs) -> None:
    """`params`: the money parameters of a new ledger (an existing one keeps its own)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    model_dir = model_dir or default_model_dir(progress=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # the ledger: --db, else the database a past `serve --db` recorded here, else DATA_DIR/ledger.db
    accounts = Accounts(data_dir, ModelConfig.load(model_dir).n_layers, db=db, params=params)
    if db:  # `consumer add` and `ledger …` given this data directory open the same database
        remember_url(data_dir, db)
    accounts.ledger.recover()  # holds a crash left open are refunded: nothing runs yet
    coordinator = Coordinator(data_dir, model_dir, p2p_port=p2p_port, accounts=accounts, **coordinator_kwargs)
    app = create_app(coordinator.pool, tokenizer, coordinator.model_id,
                     min(coordinator.context_tokens, coordinator.config.max_context_tokens),
                     coordinator.config.eos_token_ids, accounts, rate_limit_rps=rate_limit_rps)
    # Bind the API socket first so the ready line can name the real port when --api-port is 0.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, api_port))
    sock.listen(128)  # connections wait in the backlog until uvicorn takes the socket over
    addr = coordinator.start()
    print(f"coordinator ready p2p={addr} api=http://{host}:{sock.getsockname()[1]}", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        coordinator.stop()
        accounts.close()

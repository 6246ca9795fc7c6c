"""`coordinator serve`: the libp2p host, the registry, the pool and the HTTP API in one process.

Threads: the libp2p host runs its own trio loop; its handlers run in worker threads and call the
registry and pool, which are thread-safe; drivers and the planner have a thread each; uvicorn
serves the API on the main thread's asyncio loop.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import uvicorn

from contracts import ContractError, MoneyParams
from contracts.stakes import max_context_tokens
from coordinator.accounts import Accounts
from coordinator.admission import Admission, ProbeOutcome
from coordinator.api import create_app
from coordinator.audits import Auditor
from coordinator.links import ResultBoard, StreamLink
from coordinator.hop_bandwidth import HopProber
from coordinator.measurements import Measurements
from coordinator.misconduct import MisconductRecorder
from coordinator.planner import ModelShape, ProviderSpec, Workload, provider_spec_from_profile
from coordinator.pool import AssignmentFailed, Pool
from coordinator.reachability import LinkMonitor
from coordinator.registry import Registry
from coordinator.stakes import StakeKeeper
from ledger.db import remember_url
from ledger.errors import ReceiptError
from ledger.reader import LedgerReader
from node.config import ModelConfig
from node.models import default_model_dir, model_id_of
from node.transport import Frame, P2PNode, Stream, StreamClosed, TransportConfig, TransportError, load_or_create
from node.transport.identity import verify_for_peer
from wire.messages import (PROTO_ASSIGN, PROTO_CONTROL, PROTO_RESULT, AccountInfo, AccountQuery, Ack, Assign, Failed,
                           Heartbeat, Leave, Message, MessageError, Ping, Receipts, Register, Result, Retain, Unassign, decode,
                           refuse)

log = logging.getLogger("meshpool.coordinator")

ASSIGN_TIMEOUT_S = 120.0  # loading a shard takes a while
UNASSIGN_TIMEOUT_S = 10.0
PROBE_TIMEOUT_S = 2.0
RESULT_RECV_TIMEOUT_S = 3600.0  # a result stream idles while its pipeline has no work


class Coordinator:
    def __init__(self, data_dir: Path, model_dir: Path, p2p_port: int = 0, heartbeat_timeout_s: float = 5.0,
                 max_sessions: int = 8, context_tokens: int = 1024, accounts: Accounts | None = None,
                 referee_check_ppm: int = 200_000, serving_dtype: str = "", microbatches: int = 2,
                 step_timeout_s: float = 30.0, p2p_host: str = "127.0.0.1"):
        """`accounts`: consumers and the ledger; with it, stages are paid on their receipts and audited.
        `serving_dtype`: the precision every stage is assigned ("": each provider's own choice).
        `microbatches`: steps each pipeline keeps in flight (at most max_sessions, and one per device); its
        sessions are split among them (each stage holds max_sessions rounded up to a multiple of it)."""
        if microbatches < 1:
            raise ValueError(f"microbatches must be >= 1, got {microbatches}")
        microbatches = min(microbatches, max_sessions)
        self.data_dir, self.model_dir = data_dir, model_dir
        self.config = ModelConfig.load(model_dir)
        self.model_id = model_id_of(model_dir)
        self.accounts = accounts
        self.ledger_reader = LedgerReader(accounts.reader_engine) if accounts else None
        self.stakes = StakeKeeper(accounts.ledger, self.ledger_reader) if accounts else None
        self.registry = Registry(data_dir, heartbeat_timeout_s=heartbeat_timeout_s,
                                 **({"params": accounts.ledger.params, "stakes": self.stakes} if accounts else {}))
        self.identity = load_or_create(data_dir)
        # a peer that sends a malformed frame is hung up on, not only its stream; the coordinator
        # relays for providers that cannot be dialed (node/transport/reach.py)
        self.node = P2PNode(self.identity, TransportConfig(listen_host=p2p_host, listen_port=p2p_port,
                                                           disconnect_on_bad_frame=True, relay_hop=True))
        self.board = ResultBoard()
        self.max_sessions, self.context_tokens = max_sessions, context_tokens
        raw = json.loads((model_dir / "config.json").read_text())
        # the shape's own 4 bytes are a default: the pool plans each provider at the bytes of the precision it
        # assigns it (coordinator/pool.py, ProviderSpec.dtype_bytes)
        shape = ModelShape.from_hf_config(raw, name=self.model_id, bytes_per_param=4.0, activation_bytes=4)
        # the planner plans from what the coordinator measures of each provider, not from its claims
        self.measurements = Measurements(shape, max_sessions)
        self.misconduct: MisconductRecorder | None = None
        if accounts is not None:  # a contradicted claim is misconduct the ledger records (coordinator/misconduct.py)
            self.measurements.contradiction_ratio = accounts.ledger.params.misconduct_claim_ratio
            self.misconduct = MisconductRecorder(accounts.ledger, self.ledger_reader)
        self.admission = Admission(model_dir, self.model_id, self.config.n_layers, max_sessions, self._ask,
                                   self.measurements)
        self.pool = Pool(self.registry, shape, self.model_id, (self.identity.peer_id_str, ()), self._assign,
                         self._unassign, self._make_link, self._probe,
                         Workload(batch=-(-max_sessions // microbatches), context_tokens=context_tokens,
                                  microbatches_in_flight=microbatches),
                         serving_dtype=serving_dtype, step_timeout_s=step_timeout_s, measurements=self.measurements,
                         admit=self._admit if self.admission.possible else None)
        self.link_monitor = LinkMonitor(self.node, self.registry)
        self.pool.reach_links = self.link_monitor.links
        # each hop's bandwidth, timed by the provider that would send on it; never during a probe
        self.hop_prober = HopProber(self._ask, self.registry, self.measurements, self.admission.lock)
        self.auditor: Auditor | None = None
        if accounts is not None:
            self.auditor = Auditor(self.node, self.identity, self.registry, accounts.ledger,
                                   self.ledger_reader, model_dir, self.config.n_layers,
                                   self.pool.request_replan, referee_check_ppm=referee_check_ppm)
            accounts.subscribe(self.auditor.consider)

    def start(self) -> str:
        self.node.set_handler(PROTO_CONTROL, self._on_control)
        self.node.set_stream_handler(PROTO_RESULT, self._on_results)
        self.node.on_peer_lost(self._on_peer_lost)
        addr = self.node.start()
        self.pool.coordinator_addrs = (addr,)  # known once listening, before the planner's first round
        self.link_monitor.start()
        self.hop_prober.start()
        self.pool.start()
        if self.auditor is not None:
            self.auditor.start()
        return addr

    def stop(self) -> None:
        if self.auditor is not None:
            self.auditor.stop()
        self.pool.stop()
        self.hop_prober.stop()
        self.link_monitor.stop()
        self.node.close()

    def _on_peer_lost(self, peer: str) -> None:
        """A provider's connection closed (its process died, or it hung up): fail it over now, not
        after its heartbeats run out. One still alive dials again and registers anew."""
        record = self.registry.get(peer)
        if record is None or record.state in ("dead", "banned"):
            return
        log.warning("provider %s: connection closed", peer)
        self.pool.fail_peer(peer, "left" if record.state == "leaving" else "connection closed")

    # -- control --------------------------------------------------------------------------

    def _on_control(self, frame: Frame, peer: str) -> Frame:
        try:
            message = decode(frame, Register, Heartbeat, Leave, Failed, Receipts, AccountQuery)
        except MessageError as exc:
            return refuse(str(exc)).to_frame()
        return self._control(message, peer).to_frame()

    def _control(self, message: Message, peer: str) -> Message:
        if isinstance(message, Register):
            return self._register(message, peer)
        if isinstance(message, Heartbeat):
            known = self.registry.heartbeat(peer, dict(zip(message.link_peers, message.link_kinds)))
            return Ack(known, "" if known else "unknown or expired provider")
        if isinstance(message, Leave):
            return self._leave(peer)
        if isinstance(message, Failed):
            # before the step's failure reaches its driver, so that the pipeline's failure is counted
            # against the peer the report names (coordinator/backoff.py)
            self.pool.blame(message.pipeline, peer, message.peer, message.reason)
            if not self.board.deliver(message, peer):
                return refuse("no such step in flight on a pipeline of yours")
            if message.peer != peer:
                self.pool.suspect(message.peer)
            return Ack()
        if isinstance(message, Receipts):
            return self._receipts(message, peer)
        return self._account(peer)

    def _account(self, peer: str) -> Message:
        record = self.registry.get(peer)
        if record is None:
            return refuse("unknown provider")
        balance = reputation = 0
        if self.ledger_reader is not None:
            balance = self.ledger_reader.balance_units(peer)
            standing = self.ledger_reader.standing(peer)
            reputation = standing.reputation if standing else 0
        return AccountInfo(record.state, balance, reputation)

    def _receipts(self, message: Receipts, peer: str) -> Ack:
        if self.accounts is None or self.registry.get(peer) is None:
            return refuse("receipts are taken from registered providers of a paying pool")
        try:
            for receipt in message.receipts:
                self.accounts.receipts.add(receipt, peer)
        except ReceiptError as exc:
            log.warning("receipt from %s refused: %s", peer, exc)
            return refuse(f"receipt refused: {exc}")
        if self.auditor is None:
            return Ack()
        return Retain(tuple(r.request_id for r in message.receipts if self.auditor.retains(r)))

    def _register(self, message: Register, peer: str) -> Ack:
        try:
            body = message.signed_bytes(peer)
        except MessageError as exc:
            return refuse(str(exc))
        if not verify_for_peer(peer, message.public_key, body, message.signature):
            log.warning("registration from %s with a bad signature refused", peer)
            return refuse("the profile's signature does not match the peer id")
        try:
            provider_spec_from_profile(peer, message.profile, message.max_memory_bytes // 2**20)
        except ValueError as exc:  # ProfileError is a ValueError
            return refuse(f"bad profile: {exc}")
        if self.accounts is not None:
            # its ledger account (receipts must carry this key), the stake a vouch funds or its
            # balance covers (coordinator/stakes.py), and the standing it earned before
            self.accounts.open_provider(peer, message.public_key)
            standing = self.stakes.ensure(peer, self.registry.is_vouched(peer))
            if standing is not None:
                self.registry.set_standing(peer, standing)
        try:
            record = self.registry.register(peer, message.profile, list(message.addrs), message.max_memory_bytes)
        except ValueError as exc:
            return refuse(str(exc))
        self.measurements.forget_probe(peer)  # a provider that registers again is probed again
        log.info("provider %s registered (%s)", peer, record.state)
        self.pool.request_replan()
        return Ack()

    def _leave(self, peer: str) -> Ack:
        """Move the provider's work elsewhere: the planner unassigns it once no pipeline needs it,
        and the provider, which waits for that, then goes (coordinator/pool.py)."""
        if self.registry.get(peer) is None:
            return refuse("unknown provider")
        self.registry.set_state(peer, "leaving", "left")
        self.pool.request_replan()
        return Ack()

    # -- data path ------------------------------------------------------------------------

    def _on_results(self, stream: Stream) -> None:
        """Sampled tokens from the last stage of a pipeline, until the stream ends."""
        while True:
            try:
                frame = stream.recv(timeout_s=RESULT_RECV_TIMEOUT_S)
            except StreamClosed:
                return
            try:
                self.board.deliver(decode(frame, Result), stream.peer_id)
            except MessageError as exc:
                log.warning("bad frame from %s on the result stream: %s", stream.peer_id, exc)

    def _make_link(self, pipeline: str, stage_peers: tuple[str, ...]) -> StreamLink:
        return StreamLink(self.node, pipeline, stage_peers, self.board)

    def _assign(self, peer: str, assignment: Assign) -> None:
        try:
            reply = decode(self.node.request(peer, PROTO_ASSIGN, assignment.to_frame(), timeout_s=ASSIGN_TIMEOUT_S))
        except (TransportError, MessageError) as exc:
            raise AssignmentFailed(peer, f"unreachable: {exc}") from exc
        if not isinstance(reply, Ack) or not reply.ok:
            raise AssignmentFailed(peer, getattr(reply, "reason", reply.TYPE))

    def _ask(self, peer: str, message: Message, timeout_s: float) -> Message:
        """One request on the assign protocol (the admission probe's); its decoded answer."""
        return decode(self.node.request(peer, PROTO_ASSIGN, message.to_frame(), timeout_s=timeout_s))

    def _admit(self, claimed: ProviderSpec, dtype: str) -> ProbeOutcome:
        """The admission probe; a claim it contradicts is recorded as misconduct (once per signed profile,
        coordinator/misconduct.py) and the provider is planned at its measured speed all the same."""
        outcome = self.admission.admit(claimed, dtype)
        record = self.registry.get(claimed.peer_id)
        if outcome.contradicted and self.misconduct is not None and record is not None:
            standing = self.misconduct.contradicted_claim(
                claimed.peer_id, record.profile, outcome.claim_ratio,
                f"its probe took {outcome.claim_ratio:.0f}x the time its claimed figures predict")
            if standing is not None:
                self.registry.set_standing(claimed.peer_id, standing)
        return outcome

    def _unassign(self, peer: str, pipeline: str) -> None:
        try:
            self.node.request(peer, PROTO_ASSIGN, Unassign(pipeline).to_frame(), timeout_s=UNASSIGN_TIMEOUT_S)
        except TransportError as exc:
            log.info("unassign %s: %s", peer, exc)

    def _probe(self, peer: str) -> bool:
        try:
            return isinstance(decode(self.node.request(peer, PROTO_ASSIGN, Ping().to_frame(),
                                                       timeout_s=PROBE_TIMEOUT_S)), Ack)
        except (TransportError, MessageError):
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
    # holds a crash left open: settled for the tokens they delivered, the rest refunded; nothing runs yet
    accounts.recover()
    coordinator = Coordinator(data_dir, model_dir, p2p_port=p2p_port, accounts=accounts, **coordinator_kwargs)
    # no request may run more layer-tokens than the required stake covers (contracts.stakes)
    stake_tokens = max_context_tokens(coordinator.config.n_layers, accounts.ledger.params)
    if stake_tokens < 2:
        raise ContractError(f"the ledger's max_request_layer_tokens covers {stake_tokens} tokens through "
                            f"{coordinator.config.n_layers} layers: no request fits")
    app = create_app(coordinator.pool, tokenizer, coordinator.model_id,
                     min(coordinator.context_tokens, coordinator.config.max_context_tokens, stake_tokens),
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

"""SQLAlchemy tables of the ledger.

`entries` is the log and the only source of truth: `ledger verify` rebuilds everything else from
it. `accounts`, `holds` and `chain_head` are state the service keeps in step with the log inside
the same transaction, so that a write reads a few rows instead of replaying; `verify` checks that
they match the replay. Amounts are BIGINT (signed 64-bit): every value is kept below 2**63.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, CheckConstraint, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class EntryRow(Base):
    __tablename__ = "entries"
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    op_id: Mapped[str] = mapped_column(String(160))
    leg: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    debit_id: Mapped[str | None] = mapped_column(String(128), index=True)
    credit_id: Mapped[str | None] = mapped_column(String(128), index=True)
    amount_units: Mapped[int] = mapped_column(BigInteger)
    ref_id: Mapped[str | None] = mapped_column(String(160), index=True)
    meta_json: Mapped[str] = mapped_column(Text)
    ts_ms: Mapped[int] = mapped_column(BigInteger)
    prev_hash: Mapped[str] = mapped_column(String(64))
    entry_hash: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(128))
    __table_args__ = (UniqueConstraint("op_id", "leg", name="uq_entries_op_leg"),
                      CheckConstraint("amount_units >= 0", name="ck_entries_amount"))


class AccountRow(Base):
    __tablename__ = "accounts"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    public_key: Mapped[str | None] = mapped_column(String(64))
    balance_units: Mapped[int] = mapped_column(BigInteger, default=0)
    stake_units: Mapped[int] = mapped_column(BigInteger, default=0)
    slashed_units: Mapped[int] = mapped_column(BigInteger, default=0)
    reputation: Mapped[int] = mapped_column(BigInteger, default=0)
    audits_agreed: Mapped[int] = mapped_column(BigInteger, default=0)
    audits_disagreed: Mapped[int] = mapped_column(BigInteger, default=0)
    audits_passed: Mapped[int] = mapped_column(BigInteger, default=0)
    slash_count: Mapped[int] = mapped_column(BigInteger, default=0)
    banned: Mapped[bool] = mapped_column(Boolean, default=False)
    # added after ledgers existed: LedgerService adds the column to an older table (ledger/service.py)
    misconduct_count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    opened_seq: Mapped[int] = mapped_column(BigInteger)
    # The service never writes a negative balance; the database refuses one too (defence in depth).
    __table_args__ = (CheckConstraint("balance_units >= 0 AND stake_units >= 0 AND slashed_units >= 0",
                                      name="ck_accounts_non_negative"),)


class HoldRow(Base):
    __tablename__ = "holds"
    id: Mapped[str] = mapped_column(String(160), primary_key=True)
    account_id: Mapped[str] = mapped_column(String(128), index=True)  # a consumer's spending: LedgerReader.spending
    request_id: Mapped[str] = mapped_column(String(128), index=True)
    amount_units: Mapped[int] = mapped_column(BigInteger)
    released_units: Mapped[int] = mapped_column(BigInteger)
    paid_units: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(8))
    opened_seq: Mapped[int] = mapped_column(BigInteger)
    closed_seq: Mapped[int | None] = mapped_column(BigInteger)
    __table_args__ = (Index("ix_holds_status", "status"),
                      CheckConstraint("0 <= paid_units AND paid_units <= released_units AND released_units <= amount_units",
                                      name="ck_holds_amounts"))


class ReceiptRow(Base):
    """A stage receipt, stored with the settlement (op) that paid on it."""

    __tablename__ = "receipts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    op_id: Mapped[str] = mapped_column(String(160), index=True)
    stage_index: Mapped[int] = mapped_column(Integer)
    body_json: Mapped[str] = mapped_column(Text)
    __table_args__ = (UniqueConstraint("op_id", "stage_index", name="uq_receipts_op_stage"),)


class CheckpointRow(Base):
    """A signed tree head."""

    __tablename__ = "checkpoints"
    entry_count: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    head_hash: Mapped[str] = mapped_column(String(64))
    tree_root: Mapped[str] = mapped_column(String(64))
    ts_ms: Mapped[int] = mapped_column(BigInteger)
    signature: Mapped[str] = mapped_column(String(128))


class ChainHeadRow(Base):
    """One row (id 1): the lock every writer takes first, so the log has one global order."""

    __tablename__ = "chain_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    entry_count: Mapped[int] = mapped_column(BigInteger)
    head_hash: Mapped[str] = mapped_column(String(64))
    frontier_json: Mapped[str] = mapped_column(Text)
    minted_units: Mapped[int] = mapped_column(BigInteger)
    burned_units: Mapped[int] = mapped_column(BigInteger)
    last_checkpoint_count: Mapped[int] = mapped_column(BigInteger)


entries = EntryRow.__table__
accounts = AccountRow.__table__
holds = HoldRow.__table__
receipts = ReceiptRow.__table__
checkpoints = CheckpointRow.__table__
chain_head = ChainHeadRow.__table__

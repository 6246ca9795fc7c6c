"""Double-entry credit ledger with a tamper-evident, signed, hash-chained log (DESIGN decision 7).

- `service.LedgerService` — the writer the coordinator owns: accounts, mint/burn/transfer, holds and
  settlements on stage receipts (or, after a crash, on the coordinator's recorded plan), stakes,
  slashes, audits, checkpoints, `recover()` at start.
- `reader.LedgerReader`, `api.make_router` — read-only views for auditors (CLI and HTTP).
- `verify.verify` — replay from genesis offline; `ledger verify` on the command line.
- `state` (the one transition function), `legs` (what each op appends), `chain` (encoding, hashes,
  signatures), `merkle` (RFC 6962 tree, proofs), `receipts`, `models`, `store`, `db`.
"""

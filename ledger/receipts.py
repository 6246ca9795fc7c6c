"""Stage receipts (DESIGN decision 4): what a stage did for a request, signed by its provider.

The ledger stores each receipt next to the settlement it justifies and pays on it; `ledger verify`
checks its signature offline. The signed bytes are a domain tag plus the canonical JSON of every
field but the signature.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from contracts.settlement import StageWork
from ledger.chain import canonical_json, public_key_from_hex, public_key_hex
from ledger.errors import InvalidTransfer, ReceiptError

RECEIPT_DOMAIN = b"meshpool-receipt/1\x00"
MAX_FIELD_CHARS = 256


@dataclass(frozen=True)
class StageReceipt:
    request_id: str
    model: str
    layer_start: int
    layer_end: int  # exclusive
    token_count: int  # tokens this stage processed (prompt + generated)
    input_hash: str  # hex SHA-256 of the stage's input tensors
    output_hash: str  # hex SHA-256 of its output tensors
    provider_id: str  # the provider's ledger account id (its peer id)
    public_key: str  # hex raw Ed25519 public key of the provider
    signature: str = ""  # hex Ed25519 signature over signed_bytes()
    # hex SHA-256 of the hidden states at every layer boundary of the range, (L + 1, T, D): what a
    # per-layer audit re-executes from ("" commits to nothing: such a receipt fails its audit)
    layers_hash: str = ""
    dtype: str = ""  # the precision the stage served in, as the coordinator assigned it

    def body(self) -> dict:
        data = asdict(self)
        del data["signature"]
        return data

    def signed_bytes(self) -> bytes:
        return RECEIPT_DOMAIN + canonical_json(self.body())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "StageReceipt":
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ReceiptError(f"receipt fields {sorted(data)} differ from {sorted(names)}")
        receipt = cls(**data)
        receipt.check_shape()
        return receipt

    def check_shape(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            want = int if f.type in ("int", int) else str
            if type(value) is not want:
                raise ReceiptError(f"receipt field {f.name} must be {want.__name__}")
            if want is str and len(value) > MAX_FIELD_CHARS:
                raise ReceiptError(f"receipt field {f.name} longer than {MAX_FIELD_CHARS}")

    def signature_valid(self) -> bool:
        try:
            public_key_from_hex(self.public_key).verify(bytes.fromhex(self.signature), self.signed_bytes())
        except (InvalidSignature, InvalidTransfer, ValueError):
            return False
        return True

    def stage_work(self) -> StageWork:
        return StageWork(self.provider_id, self.layer_start, self.layer_end, self.token_count)


def sign_receipt(key: Ed25519PrivateKey, **body) -> StageReceipt:
    """Build and sign a receipt (providers and tests); `public_key` is filled from the key."""
    unsigned = StageReceipt(public_key=public_key_hex(key), signature="", **body)
    return StageReceipt(**{**unsigned.to_dict(), "signature": key.sign(unsigned.signed_bytes()).hex()})


def receipts_digest(receipts: list[StageReceipt] | tuple[StageReceipt, ...]) -> str:
    """Hex SHA-256 of the canonical list of receipts, as bound into the settlement entry."""
    import hashlib

    return hashlib.sha256(canonical_json([r.to_dict() for r in receipts])).hexdigest()

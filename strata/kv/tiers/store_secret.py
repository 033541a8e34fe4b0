"""StoreSecret: the key that authenticates the blocks of a shared KV store (disk, remote).

Anyone who can write to a shared store could otherwise forge blocks that pass its
checksum and change another client's output. With a secret:
- every block carries a keyed BLAKE2b-128 MAC over its header, token ids and payload in
  place of the checksum (block_format.py); a block whose MAC fails is a miss, and is
  deleted;
- the store's namespace (the disk directory, the remote key prefix) includes a tag
  derived from the secret, so engines with different secrets, or none, never read each
  other's blocks.

With `encrypt` (--kv-store-encrypt) blocks are sealed with AES-256-GCM instead: token ids
and payload are ciphertext, the header is authenticated as associated data.

Three keys are derived from the secret, each with its own BLAKE2b personalisation, so the
namespace tag (visible to whoever lists the store) says nothing about the MAC or AEAD key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path

MIN_SECRET_BYTES = 16
SECRET_ENV = "STRATA_KV_STORE_SECRET"
MAC_BYTES = 16


@dataclass(frozen=True)
class StoreSecret:
    """encrypt: seal token ids and payload with AES-256-GCM (block format version 3)
    instead of a MAC alone; such stores have a namespace of their own."""

    mac_key: bytes = field(repr=False)
    aead_key: bytes = field(repr=False)
    namespace: str  # 16 hex characters (+ "e" when encrypting), safe to show
    encrypt: bool = False

    @classmethod
    def of(cls, secret: bytes, encrypt: bool = False) -> StoreSecret:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(
                f"the KV store secret must be at least {MIN_SECRET_BYTES} bytes, "
                f"got {len(secret)}"
            )
        mac_key = hashlib.blake2b(secret, digest_size=32, person=b"strata-kv-mac").digest()
        aead_key = hashlib.blake2b(secret, digest_size=32, person=b"strata-kv-aead").digest()
        tag = hashlib.blake2b(secret, digest_size=8, person=b"strata-kv-ns").hexdigest()
        return cls(mac_key, aead_key, tag + ("e" if encrypt else ""), encrypt)

    def mac(self, *parts: bytes | memoryview) -> bytes:
        """The keyed BLAKE2b-128 of the parts, in order."""
        digest = hashlib.blake2b(key=self.mac_key, digest_size=MAC_BYTES)
        for part in parts:
            digest.update(part)
        return digest.digest()

    def verify(self, tag: bytes, *parts: bytes | memoryview) -> bool:
        return hmac.compare_digest(tag, self.mac(*parts))


def resolve_secret(
    secret: str | bytes | None, secret_file: str | None, encrypt: bool = False
) -> StoreSecret | None:
    """The configured secret: given directly (LLM(kv_store_secret=...)), else the file's
    contents (--kv-store-secret-file, surrounding whitespace dropped), else
    $STRATA_KV_STORE_SECRET; None when none is set (ValueError if `encrypt` asks for one)."""
    raw: bytes | None
    if secret is not None:
        raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    elif secret_file is not None:
        try:
            raw = Path(secret_file).read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the KV store secret file {secret_file}: {exc}") from None
    else:
        env = os.environ.get(SECRET_ENV)
        raw = env.encode() if env else None
    if raw is None and encrypt:
        raise ValueError(
            f"kv_store_encrypt needs a store secret: --kv-store-secret-file or ${SECRET_ENV}"
        )
    return None if raw is None else StoreSecret.of(raw, encrypt)

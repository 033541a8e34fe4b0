"""The self-describing byte format of a stored block (disk files, remote values).

    offset  size
    0       8     magic b"STRATAKV"
    8       2     format version (little-endian u16)
    10      2     header length H, bytes from offset 0 to the token ids
    12      16    version 1: checksum, xxh3-128 of everything after this field;
                  version 2: keyed BLAKE2b-128 MAC (store_secret.py) of everything but
                  this field; version 3: the AES-GCM nonce (12 bytes, then 4 zero)
    28      32    block key
    60      32    model fingerprint (raw SHA-256)
    92      4x5   layers, kv heads, head dim, block size (tokens), token count (u32 each)
    112     16    dtype name, NUL-padded ASCII
    128     16    codec name, NUL-padded ASCII
    144     8     payload length in bytes (u64)
    H       4*n   token ids (u32 each, n = token count)
    ...     P     payload: [layers, k|v, tokens, kv heads, head dim] in dtype
    ...     16    version 3 only: the GCM tag; token ids and payload are ciphertext,
                  and the header is the associated data

A reader accepts a block only if every header field equals what it expects (its own
layout and the key it asked for), the lengths add up and the checksum matches. A store
with a secret writes and accepts only version 2 blocks whose MAC verifies (version 3
blocks that decrypt, when it encrypts); one without writes and accepts only version 1.
"""

from __future__ import annotations

import os
import struct
import warnings

import torch
import xxhash
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from strata.kv.tiers.base import KEY_BYTES, BlockLayout, StoredBlock
from strata.kv.tiers.store_secret import StoreSecret

MAGIC = b"STRATAKV"
VERSION = 1  # checksummed
VERSION_MAC = 2  # authenticated
VERSION_SEALED = 3  # encrypted and authenticated
GCM_TAG_BYTES = 16
_HEAD = struct.Struct("<8sHH16s32s32s5I16s16sQ")
HEADER_BYTES = _HEAD.size  # 152


class BlockFormatError(ValueError):
    """A stored block that must not be used; the message says which check failed."""


def _pad(text: str) -> bytes:
    raw = text.encode("ascii")
    if len(raw) > 16:
        raise ValueError(f"{text!r} is longer than 16 bytes")
    return raw.ljust(16, b"\0")


def encoded_size(layout: BlockLayout, secret: StoreSecret | None = None) -> int:
    sealed = secret is not None and secret.encrypt
    return HEADER_BYTES + 4 * layout.block_size + layout.nbytes + GCM_TAG_BYTES * sealed


def _version(secret: StoreSecret | None) -> int:
    if secret is None:
        return VERSION
    return VERSION_SEALED if secret.encrypt else VERSION_MAC


def encode(
    layout: BlockLayout, block: StoredBlock, secret: StoreSecret | None = None
) -> list[memoryview]:
    """The block as buffers to write in order (header+tokens, payload): no payload copy.
    With a secret, a version 2 block carrying the MAC."""
    if len(block.key) != KEY_BYTES:
        raise ValueError(f"block keys are {KEY_BYTES} bytes, got {len(block.key)}")
    if len(block.token_ids) != layout.block_size:
        raise ValueError(
            f"a stored block holds {layout.block_size} tokens, got {len(block.token_ids)}"
        )
    payload = memoryview(block.payload.contiguous().view(torch.uint8).numpy().data).cast("B")
    if payload.nbytes != layout.nbytes:
        raise ValueError(f"payload is {payload.nbytes} bytes, layout says {layout.nbytes}")
    tokens = struct.pack(f"<{len(block.token_ids)}I", *block.token_ids)
    fields = (
        block.key,
        bytes.fromhex(layout.fingerprint),
        layout.num_layers,
        layout.num_kv_heads,
        layout.head_dim,
        layout.block_size,
        len(block.token_ids),
        _pad(layout.dtype),
        _pad(layout.codec),
        payload.nbytes,
    )
    body = struct.pack("<32s32s5I16s16sQ", *fields)
    if secret is not None and secret.encrypt:
        return _seal(secret, body, tokens, payload)
    if secret is not None:
        prefix = struct.pack("<8sHH", MAGIC, VERSION_MAC, HEADER_BYTES)
        tag = secret.mac(prefix, body, tokens, payload)
        return [memoryview(prefix + tag + body + tokens), payload]
    digest = xxhash.xxh3_128()
    digest.update(body)
    digest.update(tokens)
    digest.update(payload)
    head = struct.pack("<8sHH16s", MAGIC, VERSION, HEADER_BYTES, digest.digest()) + body
    return [memoryview(head + tokens), payload]


def decode(
    layout: BlockLayout, data: bytes | memoryview, key: bytes, secret: StoreSecret | None = None
) -> StoredBlock:
    """Parse and verify a block read back; raises BlockFormatError on any mismatch (with a
    secret: unless it is a version 2 block whose MAC verifies).

    The returned payload is a uint8 tensor over `data` (no copy): keep `data` alive.
    """
    view = memoryview(data).cast("B")
    version, checksum, ntok, plen = _check_header(layout, view, key, secret)
    total = HEADER_BYTES + 4 * ntok + plen + GCM_TAG_BYTES * (version == VERSION_SEALED)
    if view.nbytes != total:
        raise BlockFormatError(f"length {view.nbytes} bytes, header says {total}")
    if secret is not None and secret.encrypt:
        view = _open(secret, view, checksum[:12])  # the plaintext, header in front
    else:
        _verify(view, checksum, secret)
    tokens = struct.unpack_from(f"<{ntok}I", view, HEADER_BYTES)
    with warnings.catch_warnings():  # read-only network buffers: the payload is never written
        warnings.simplefilter("ignore", UserWarning)
        payload = torch.frombuffer(
            view, dtype=torch.uint8, offset=HEADER_BYTES + 4 * ntok, count=plen
        )
    return StoredBlock(key=key, token_ids=tuple(tokens), payload=payload)


def verify_split(
    layout: BlockLayout,
    head: memoryview,
    payload: memoryview,
    key: bytes,
    secret: StoreSecret | None = None,
) -> tuple[int, ...]:
    """Check a block read in two parts, the header with the token ids (`head`) and the
    payload (read straight into where it is used); its token ids, or BlockFormatError.
    Not for sealed (version 3) blocks: their payload is ciphertext."""
    if secret is not None and secret.encrypt:
        raise ValueError("a sealed block is decrypted whole: use decode")
    _, checksum, ntok, plen = _check_header(layout, head, key, secret)
    if head.nbytes != HEADER_BYTES + 4 * ntok or payload.nbytes != plen:
        total, want = head.nbytes + payload.nbytes, HEADER_BYTES + 4 * ntok + plen
        raise BlockFormatError(f"length {total} bytes, header says {want}")
    _verify(head, checksum, secret, payload)
    return tuple(struct.unpack_from(f"<{ntok}I", head, HEADER_BYTES))


def _check_header(
    layout: BlockLayout, view: memoryview, key: bytes, secret: StoreSecret | None
) -> tuple[int, bytes, int, int]:
    """(version, checksum field, token count, payload length) of a header whose every
    field is what this reader expects; BlockFormatError otherwise."""
    if view.nbytes < HEADER_BYTES:
        raise BlockFormatError(f"truncated: {view.nbytes} bytes, a header alone is {HEADER_BYTES}")
    (magic, version, head_len, checksum, stored_key, fingerprint, layers, heads, dim, bsize,
     ntok, dtype, codec, plen) = _HEAD.unpack_from(view)  # fmt: skip
    if magic != MAGIC:
        raise BlockFormatError("not a Strata KV block (bad magic)")
    want_version = _version(secret)
    if version != want_version or head_len != HEADER_BYTES:
        raise BlockFormatError(
            f"format version {version} (header {head_len} B); expected {want_version}"
        )
    expected: dict[str, tuple[object, object]] = {
        "key": (stored_key, key),
        "model fingerprint": (fingerprint.hex(), layout.fingerprint),
        "layers": (layers, layout.num_layers),
        "kv heads": (heads, layout.num_kv_heads),
        "head dim": (dim, layout.head_dim),
        "block size": (bsize, layout.block_size),
        "token count": (ntok, layout.block_size),
        "dtype": (dtype.rstrip(b"\0").decode("ascii", "replace"), layout.dtype),
        "codec": (codec.rstrip(b"\0").decode("ascii", "replace"), layout.codec),
        "payload length": (plen, layout.nbytes),
    }
    for name, (found, want) in expected.items():
        if found != want:
            if isinstance(found, bytes) and isinstance(want, bytes):
                shown: tuple[object, object] = (found.hex()[:16], want.hex()[:16])
            else:
                shown = (found, want)
            raise BlockFormatError(f"{name} mismatch: stored {shown[0]}, expected {shown[1]}")
    return version, checksum, ntok, plen


def _verify(
    view: memoryview, tag: bytes, secret: StoreSecret | None, *rest: memoryview
) -> None:
    """The checksum (or MAC) over `view` after its check field, then `rest` in order."""
    if secret is not None:
        if not secret.verify(tag, view[:12], view[28:], *rest):
            raise BlockFormatError("MAC mismatch: not written with this store's secret")
        return
    digest = xxhash.xxh3_128()
    digest.update(view[28:])
    for part in rest:
        digest.update(part)
    if digest.digest() != tag:
        raise BlockFormatError("checksum mismatch")


def _seal(secret: StoreSecret, body: bytes, tokens: bytes, payload: memoryview) -> list[memoryview]:
    """A version 3 block: header (with the nonce) in the clear and authenticated, token
    ids and payload encrypted, the GCM tag last."""
    nonce = os.urandom(12)
    head = struct.pack("<8sHH16s", MAGIC, VERSION_SEALED, HEADER_BYTES, nonce + bytes(4)) + body
    sealed = AESGCM(secret.aead_key).encrypt(nonce, tokens + payload.tobytes(), head)
    return [memoryview(head), memoryview(sealed)]


def _open(secret: StoreSecret, view: memoryview, nonce: bytes) -> memoryview:
    try:
        plain = AESGCM(secret.aead_key).decrypt(nonce, view[HEADER_BYTES:], view[:HEADER_BYTES])
    except InvalidTag:
        message = "authentication failed: not sealed with this store's secret"
        raise BlockFormatError(message) from None
    return memoryview(bytes(view[:HEADER_BYTES]) + plain)

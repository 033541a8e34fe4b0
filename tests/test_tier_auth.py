"""Authenticated tier blocks: with a store secret every disk or remote block carries a
keyed MAC, forged or foreign blocks are deleted misses, and the secret is part of the
namespace. Passwords of store URLs never reach the logs."""

from __future__ import annotations

import hashlib
import logging
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
import xxhash

from strata import LLM, SamplingParams
from strata.env_report import kv_server_facts
from strata.kv.tiers import block_format
from strata.kv.tiers.base import BlockLayout, StoredBlock
from strata.kv.tiers.disk import DiskTier, layout_digest
from strata.kv.tiers.remote import RemoteTier
from strata.kv.tiers.store_secret import SECRET_ENV, StoreSecret, resolve_secret
from strata.kv.tiers.store_url import redact_url
from tests.redis_server import RedisServer, running_server

LAYOUT = BlockLayout("ab" * 32, num_layers=2, num_kv_heads=2, head_dim=4, block_size=4,
                     dtype="float16")  # fmt: skip
SECRET = StoreSecret.of(b"correct horse battery staple")
OTHER = StoreSecret.of(b"another secret of sixteen+ bytes")
FILE = block_format.encoded_size(LAYOUT)


def key(i: int) -> bytes:
    return hashlib.sha256(f"block {i}".encode()).digest()


def block(i: int, salt: int = 7) -> StoredBlock:
    payload = (torch.arange(LAYOUT.nbytes, dtype=torch.int64) * (i + salt) % 251).to(torch.uint8)
    return StoredBlock(key(i), tuple(range(i, i + LAYOUT.block_size)), payload)


def encoded(b: StoredBlock, secret: StoreSecret | None) -> bytes:
    return b"".join(block_format.encode(LAYOUT, b, secret))


def forged(b: StoredBlock) -> bytes:
    """What a writer without the secret can make: a v2 block whose checksum field holds
    a fresh xxh3 of a rewritten payload."""
    data = bytearray(encoded(b, SECRET))
    data[-8:] = b"\x01" * 8
    data[12:28] = xxhash.xxh3_128(bytes(data[28:])).digest()
    return bytes(data)


def test_mac_round_trip_and_what_fails_it() -> None:
    data = encoded(block(0), SECRET)
    assert struct.unpack_from("<H", data, 8)[0] == block_format.VERSION_MAC
    got = block_format.decode(LAYOUT, data, key(0), SECRET)
    assert got.token_ids == block(0).token_ids and torch.equal(got.payload, block(0).payload)
    cases = {
        forged(block(0)): "MAC mismatch",
        encoded(block(0), OTHER): "MAC mismatch",
        encoded(block(0), None): r"format version 1 \(header 152 B\); expected 2",
        data[:40] + b"\xff" + data[41:]: "mismatch",  # a header byte: fails a field or MAC
    }
    for bad, reason in cases.items():
        with pytest.raises(block_format.BlockFormatError, match=reason):
            block_format.decode(LAYOUT, bad, key(0), SECRET)
    with pytest.raises(block_format.BlockFormatError, match="expected 1"):
        block_format.decode(LAYOUT, data, key(0), None)  # no secret: v2 blocks are foreign


def test_secret_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    assert resolve_secret(None, None) is None
    path = tmp_path / "secret"
    path.write_bytes(b"  correct horse battery staple\n")
    assert resolve_secret(None, str(path)) == SECRET
    assert resolve_secret("correct horse battery staple", None) == SECRET
    monkeypatch.setenv(SECRET_ENV, "correct horse battery staple")
    assert resolve_secret(None, None) == SECRET
    with pytest.raises(ValueError, match="at least 16 bytes, got 5"):
        resolve_secret("short", None)
    with pytest.raises(ValueError, match="cannot read the KV store secret file"):
        resolve_secret(None, str(tmp_path / "missing"))
    assert "horse" not in repr(SECRET) and len(SECRET.namespace) == 16


def test_disk_tier_rejects_and_deletes_forged_blocks(tmp_path: Path) -> None:
    tier = DiskTier(LAYOUT, tmp_path, capacity_bytes=10 * FILE, secret=SECRET)
    assert tier.root == tmp_path / f"{'ab' * 8}-{layout_digest(LAYOUT)}-{SECRET.namespace}"
    tier.put([block(0), block(1)])
    (got,) = tier.get([key(0)])
    assert got is not None and torch.equal(got.payload, block(0).payload)
    tier.path_of(key(1)).write_bytes(forged(block(1)))
    assert tier.get([key(1)]) == [None]
    assert not tier.path_of(key(1)).exists()
    assert tier.stats.snapshot()["corrupt"] == 1
    # Another secret, or none, reads another directory: the blocks are not there at all.
    assert DiskTier(LAYOUT, tmp_path, 10 * FILE, secret=OTHER).contains([key(0)]) == [False]
    assert DiskTier(LAYOUT, tmp_path, 10 * FILE).contains([key(0)]) == [False]


def test_disk_tier_deletes_a_corrupt_file(tmp_path: Path) -> None:
    tier = DiskTier(LAYOUT, tmp_path, capacity_bytes=10 * FILE)
    tier.put([block(3)])
    path = tier.path_of(key(3))
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    assert tier.get([key(3)]) == [None]
    assert not path.exists() and tier.contains([key(3)]) == [False]


def test_redacted_urls() -> None:
    (_, server) = kv_server_facts("redis://:pw@127.0.0.1:1", timeout_s=0.05)
    assert server.name == "KV server at redis://:***@127.0.0.1:1"
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("valkey://user:pw@h:1") == "valkey://user:***@h:1"
    assert redact_url("redis://h:1") == "redis://h:1"


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    yield from running_server(tmp_path_factory)


def test_remote_tier_rejects_and_deletes_forged_blocks(valkey: RedisServer) -> None:
    client = redis.Redis.from_url(valkey.url)
    client.flushall()
    tier = RemoteTier(LAYOUT, valkey.url, secret=SECRET)
    assert tier.prefix.decode().endswith(f":{SECRET.namespace}:")
    tier.put([block(0), block(1)])
    client.set(tier.name_of(key(1)), forged(block(1)))
    got = tier.get([key(0), key(1)])
    assert got[0] is not None and torch.equal(got[0].payload, block(0).payload)
    assert got[1] is None and client.exists(tier.name_of(key(1))) == 0
    assert tier.stats.snapshot()["corrupt"] == 1
    assert RemoteTier(LAYOUT, valkey.url, secret=OTHER).contains([key(0)]) == [False]
    tier.close()


def test_remote_password_from_env_and_never_logged(
    valkey: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    client = redis.Redis.from_url(valkey.url)
    client.config_set("requirepass", "s3cr3t-pw")
    try:
        monkeypatch.setenv("STRATA_KV_REMOTE_PASSWORD", "s3cr3t-pw")
        tier = RemoteTier(LAYOUT, valkey.url)
        tier.put([block(2)])
        assert tier.get([key(2)])[0] is not None
        monkeypatch.delenv("STRATA_KV_REMOTE_PASSWORD")
        url = valkey.url.replace("redis://", "redis://:s3cr3t-pw@")
        with caplog.at_level(logging.INFO):
            in_url = RemoteTier(LAYOUT, url)
            assert in_url.get([key(2)])[0] is not None
            assert "s3cr3t-pw" not in in_url.describe()
            RemoteTier(LAYOUT, url.replace("s3cr3t-pw", "wrong")).get([key(2)])  # logs
        assert "s3cr3t-pw" not in caplog.text and "wrong" not in caplog.text
        assert ":***@" in caplog.text
    finally:
        redis.Redis.from_url(valkey.url, password="s3cr3t-pw").config_set("requirepass", "")


SEALED = StoreSecret.of(b"correct horse battery staple", encrypt=True)


def test_sealed_blocks_hide_tokens_and_payload() -> None:
    data = encoded(block(0), SEALED)
    assert len(data) == block_format.encoded_size(LAYOUT, SEALED) == FILE + 16
    assert struct.unpack_from("<H", data, 8)[0] == block_format.VERSION_SEALED
    plain = encoded(block(0), None)
    assert data[152:168] != plain[152:168]  # token ids are ciphertext
    assert block(0).payload.numpy().tobytes()[:64] not in data
    got = block_format.decode(LAYOUT, data, key(0), SEALED)
    assert got.token_ids == block(0).token_ids and torch.equal(got.payload, block(0).payload)
    assert encoded(block(0), SEALED) != data  # a fresh nonce each time
    flipped = data[:200] + bytes([data[200] ^ 1]) + data[201:]
    for bad, secret in ((flipped, SEALED), (data, StoreSecret.of(b"x" * 16, encrypt=True))):
        with pytest.raises(block_format.BlockFormatError, match="authentication failed"):
            block_format.decode(LAYOUT, bad, key(0), secret)
    with pytest.raises(block_format.BlockFormatError, match="expected 2"):
        block_format.decode(LAYOUT, data, key(0), SECRET)  # MAC-only stores refuse them
    assert SEALED.namespace == SECRET.namespace + "e"
    with pytest.raises(ValueError, match="kv_store_encrypt needs a store secret"):
        resolve_secret(None, None, encrypt=True)


def test_disk_tier_with_encryption(tmp_path: Path) -> None:
    tier = DiskTier(LAYOUT, tmp_path, capacity_bytes=10 * (FILE + 16), secret=SEALED)
    tier.put([block(4)])
    assert tier.path_of(key(4)).stat().st_size == FILE + 16
    (got,) = DiskTier(LAYOUT, tmp_path, 10 * (FILE + 16), secret=SEALED).get([key(4)])
    assert got is not None and torch.equal(got.payload, block(4).payload)


def test_engine_outputs_are_equal_through_an_authenticated_disk_tier(
    tiny_models: dict[str, Any], tmp_path: Path
) -> None:
    folder, _ = tiny_models["llama"]
    kw = {
        "device": "cpu", "num_kv_blocks": 64, "block_size": 4, "max_model_len": 64,
        "kv_disk_dir": str(tmp_path), "kv_store_secret": "correct horse battery staple",
    }  # fmt: skip
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompt = list(range(3, 40))
    outs = []
    for encrypt in (False, True, True):
        llm = LLM(str(folder), kv_store_encrypt=encrypt, **kw)  # type: ignore[arg-type]
        outs.append((llm.generate([prompt], params)[0].token_ids, llm.stats()))
        llm.close()
    assert outs[0][0] == outs[1][0] == outs[2][0]
    assert outs[2][1]["prefix_cache_tier_hit_tokens"] == 36  # found sealed on disk
    assert outs[1][1]["prefix_cache_tier_hit_tokens"] == 0  # a namespace of its own


def test_a_shared_store_without_a_secret_warns_at_start(
    valkey: RedisServer, tiny_models: dict[str, Any], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    folder, _ = tiny_models["llama"]
    kw: dict[str, Any] = {"device": "cpu", "num_kv_blocks": 64, "block_size": 4,
                          "max_model_len": 64, "kv_remote": valkey.url}  # fmt: skip
    with caplog.at_level(logging.INFO, logger="strata.kv.tiers"):
        LLM(str(folder), **kw).close()
    assert "its blocks are not authenticated" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="strata.kv.tiers"):
        LLM(str(folder), kv_store_secret="correct horse battery staple", **kw).close()
    assert "not authenticated" not in caplog.text
    assert f"KV store blocks are authenticated (namespace {SECRET.namespace})" in caplog.text

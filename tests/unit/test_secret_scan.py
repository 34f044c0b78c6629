"""The secret scanner: finds keys in each encoding inside binary blobs, and nothing in noise.

The encodings a test embeds are computed here with the standard library and `cryptography`,
independently of the scanner's own variant generation.
"""

from __future__ import annotations

import base64
import json
import os
import random
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keyturn.adapters.keys import CryptoKeys
from keyturn.testing.secret_scan import (
    MIN_VARIANT_BYTES,
    Finding,
    assert_no_secrets,
    describe,
    scan_bytes,
    scan_paths,
    variant_kinds,
    variants,
)

KEYS = CryptoKeys()
RNG = random.Random(20260126)


def _blob_with(payload: bytes) -> bytes:
    """`payload` at a random offset inside random binary data."""
    before = RNG.randbytes(RNG.randrange(1, 5000))
    after = RNG.randbytes(RNG.randrange(1, 5000))
    return before + payload + after


def _raw_private_forms(private_pem: bytes) -> dict[str, bytes]:
    key = serialization.load_pem_private_key(private_pem, password=None)
    forms = {
        "der": key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    }
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        pub = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        forms["raw-seed"] = seed
        forms["raw-seed+public"] = seed + pub
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        forms["raw-scalar"] = key.private_numbers().private_value.to_bytes(32, "big")
    elif isinstance(key, rsa.RSAPrivateKey):
        d = key.private_numbers().d
        forms["rsa-d"] = d.to_bytes((d.bit_length() + 7) // 8, "big")
    return forms


def _encodings(data: bytes) -> dict[str, bytes]:
    return {
        "": data,
        "base64": base64.b64encode(data),
        "base64-nopad": base64.b64encode(data).rstrip(b"="),
        "base64url": base64.urlsafe_b64encode(data),
        "base64url-nopad": base64.urlsafe_b64encode(data).rstrip(b"="),
        "hex": data.hex().encode(),
        "HEX": data.hex().upper().encode(),
    }


@pytest.mark.parametrize("algorithm", ["ed25519", "ecdsa-p256", "rsa-2048"])
def test_finds_a_pem_key_in_each_encoding_inside_a_binary_blob(algorithm: str) -> None:
    pem = KEYS.generate(algorithm).private_pem
    secrets = {"sa-key": pem}
    checked = 0
    for form_name, form in {"exact": pem, **_raw_private_forms(pem)}.items():
        for encoding, payload in _encodings(form).items():
            if len(payload) < MIN_VARIANT_BYTES:
                continue
            kind = f"{encoding} of {form_name}" if encoding else form_name
            before = RNG.randbytes(RNG.randrange(1, 5000))
            blob = before + payload + RNG.randbytes(RNG.randrange(1, 5000))
            findings = scan_bytes(blob, secrets)
            assert all(f.secret == "sa-key" for f in findings)
            # Overlapping variants may be found too (the DER holds the seed); one of the
            # findings must be the embedded payload itself.
            assert len(before) in {f.offset for f in findings}, f"{kind} not found"
            checked += 1
    assert checked >= 20


@pytest.mark.parametrize("shift", [0, 1, 2])
def test_finds_a_key_inside_a_longer_base64_stream(shift: int) -> None:
    """A key serialized inside a bigger document that is then base64-encoded as a whole."""
    pem = KEYS.generate("ed25519").private_pem
    seed = _raw_private_forms(pem)["raw-seed"]
    for urlsafe in (False, True):
        encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
        wrapped = encode(b"x" * shift + seed + b"trailing document bytes")
        assert encode(seed)[:40] not in wrapped or shift == 0
        assert scan_bytes(_blob_with(wrapped), {"k": pem}), (shift, urlsafe)


def test_finds_pem_text_escaped_in_json_and_with_crlf() -> None:
    pem = KEYS.generate("rsa-2048").private_pem  # multi-line body
    as_json = json.dumps({"config": {"key": pem.decode()}}).encode()
    assert pem not in as_json
    assert {f.kind for f in scan_bytes(as_json, {"k": pem})} >= {"json-escaped"}
    crlf = pem.replace(b"\n", b"\r\n")
    assert "crlf" in {f.kind for f in scan_bytes(_blob_with(crlf), {"k": pem})}


def test_finds_plain_string_secrets_in_their_encodings() -> None:
    webhook_secret = "whs-" + os.urandom(16).hex()
    for payload in _encodings(webhook_secret.encode()).values():
        [finding, *_] = scan_bytes(_blob_with(payload), {"webhook": webhook_secret})
        assert finding.secret == "webhook"


def test_public_key_pem_yields_its_der() -> None:
    public = KEYS.generate("ed25519").public_pem
    der = serialization.load_pem_public_key(public.encode()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert der in variants(public)
    assert base64.b64encode(der) in variants(public)


def test_no_false_positives_on_random_data() -> None:
    secrets = {
        "ed": KEYS.generate("ed25519").private_pem,
        "ec": KEYS.generate("ecdsa-p256").private_pem,
        "token": "eyJhbGciOiJub25lIn0.eyJzdWIiOiJzYSJ9.",
    }
    noise = RNG.randbytes(2_000_000)
    noise += base64.b64encode(RNG.randbytes(500_000)) + RNG.randbytes(500_000).hex().encode()
    assert scan_bytes(noise, secrets) == []


def test_short_variants_are_dropped() -> None:
    assert variants(b"abcde") == set()  # base64 8, hex 10: all below 16 bytes
    # base64 "MDEyMzQ1Njc4OQ==" is 16 bytes (kept); unpadded it is 14 (dropped).
    ten = variants(b"0123456789")
    assert ten == {b"30313233343536373839", b"30313233343536373839".upper(), b"MDEyMzQ1Njc4OQ=="}
    assert all(len(v) >= MIN_VARIANT_BYTES for v in variants(KEYS.generate("ed25519").private_pem))


def test_variant_kinds_cover_the_documented_forms() -> None:
    # (When two encodings give the same bytes, e.g. base64 without '+' or '/' equals its
    # base64url, the variant keeps the first kind's name: standard base64 comes first.)
    kinds = set(variant_kinds(KEYS.generate("ed25519").private_pem).values())
    for expected in [
        "exact",
        "der",  # the PEM body (re-serialized PKCS#8 is the same bytes)
        "raw-seed",
        "raw-seed+public",
        "base64 of der",
        "base64-nopad of raw-seed",
        "hex of raw-seed",
        "HEX of raw-seed",
    ]:
        assert expected in kinds, expected
    ec_kinds = set(variant_kinds(KEYS.generate("ecdsa-p256").private_pem).values())
    assert {"raw-scalar", "traditional-der", "base64 of raw-scalar"} <= ec_kinds


def test_scan_paths_walks_directories_and_reports_files(tmp_path: Path) -> None:
    pem = KEYS.generate("ed25519").private_pem
    seed_hex = _raw_private_forms(pem)["raw-seed"].hex().encode()
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "clean.log").write_bytes(RNG.randbytes(10_000))
    leaky = tmp_path / "logs" / "nested" / "worker.log"
    leaky.parent.mkdir()
    leaky.write_bytes(b'{"event": "debug", "seed": "' + seed_hex + b'"}\n')
    db = tmp_path / "state.db"
    db.write_bytes(_blob_with(pem))
    (tmp_path / "link.db").symlink_to(db)  # not followed: no duplicate finding

    findings = scan_paths([tmp_path], {"sa-key": pem})
    by_file = {f.path: f for f in findings}
    assert set(by_file) == {leaky, db}
    assert by_file[leaky].kind == "hex of raw-seed"
    assert by_file[leaky].offset == leaky.read_bytes().index(seed_hex)
    assert scan_paths([tmp_path / "logs" / "clean.log"], {"sa-key": pem}) == []
    with pytest.raises(AssertionError, match="secret leak"):
        assert_no_secrets([tmp_path], {"sa-key": pem})
    assert_no_secrets([tmp_path / "logs" / "clean.log"], {"sa-key": pem})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_paths([tmp_path / "missing"], {"sa-key": pem})


def test_findings_never_contain_the_secret(tmp_path: Path) -> None:
    pem = KEYS.generate("ecdsa-p256").private_pem
    leak = tmp_path / "leak.txt"
    leak.write_bytes(_blob_with(pem))
    findings = scan_paths([tmp_path], {"sa-key": pem})
    assert findings
    text = describe(findings) + repr(findings)
    assert "sa-key" in text and str(leak) in text
    assert scan_bytes(text, {"sa-key": pem}) == []
    assert str(Finding("s", "exact", None, 3)) == (
        "secret 's' found as exact in the scanned data at offset 3"
    )

"""keyturn.webhooks: the verifier (every rejection reason), WebhookVerifier and SecretsFile."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from starlette.datastructures import Headers

from keyturn.testing.secret_scan import scan_bytes
from keyturn.webhooks import (
    REASONS,
    SIGNATURE_HEADER,
    SecretsFile,
    SecretsFileError,
    SignatureError,
    Verified,
    WebhookVerifier,
    render_secrets_document,
    secrets_version,
    sign,
    verify,
)

OLD = "whs-" + "0a1b2c3d4e5f" * 4
NEW = "whs-" + "f9e8d7c6b5a4" * 4
WRONG = "whs-" + "123456789abc" * 4
NOW = 1_800_000_000.0


def event_body(*, sent: float | None = NOW, event_id: str = "whe-abc123", **extra: Any) -> bytes:
    event: dict[str, Any] = {
        "id": event_id,
        "kind": "wallet.created",
        "date": "2027-01-15T08:00:00.000Z",
        "data": {"walletId": "wa-1", "amount": "10"},
        "status": "pending",
        "deliveryAttempt": 1,
        **extra,
    }
    if sent is not None:
        event["timestampSent"] = sent
    return json.dumps(event, separators=(",", ":")).encode()


def hmac_header(secret: str, body: bytes) -> str:
    """Independent of keyturn.webhooks.sign: the format from the Dfns notes."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def rejection(body: bytes, header: str | None, secrets: list[str], **kw: Any) -> SignatureError:
    with pytest.raises(SignatureError) as caught:
        verify(body, header, secrets, now=kw.pop("now", NOW), **kw)
    return caught.value


def assert_clean(error: SignatureError) -> None:
    """One line, and no secret in any form (message, str, repr)."""
    for text in (error.message, str(error), repr(error)):
        assert "\n" not in text
        assert scan_bytes(text, {"old": OLD, "new": NEW, "wrong": WRONG}) == []


# ------------------------------------------------------------------------------------- verify


def test_sign_matches_the_documented_format() -> None:
    body = event_body()
    assert sign(OLD, body) == hmac_header(OLD, body)


@pytest.mark.parametrize(("secret", "index"), [(OLD, 0), (NEW, 1)])
def test_accepts_a_delivery_signed_with_either_secret(secret: str, index: int) -> None:
    body = event_body()
    verified = verify(body, hmac_header(secret, body), [OLD, NEW], now=NOW)
    assert verified.secret_index == index
    assert verified.event_id == "whe-abc123"
    assert verified.kind == "wallet.created"
    assert verified.event["data"] == {"walletId": "wa-1", "amount": "10"}
    assert verified.timestamp_sent == NOW


def test_wrong_secret_is_bad_signature() -> None:
    body = event_body()
    error = rejection(body, hmac_header(WRONG, body), [OLD, NEW])
    assert error.reason == "bad_signature"
    assert error.event_id == "whe-abc123"  # parsed for the record, though unverified
    assert "2 webhook secret" in error.message
    assert_clean(error)


def test_tampered_body_is_bad_signature() -> None:
    body = event_body()
    header = hmac_header(OLD, body)
    tampered = body.replace(b'"amount":"10"', b'"amount":"99"')
    assert tampered != body
    assert rejection(tampered, header, [OLD, NEW]).reason == "bad_signature"


def test_the_raw_body_is_verified_never_a_reserialization() -> None:
    # a sender with other spacing: valid as sent, invalid once re-serialized compactly
    event = json.loads(event_body())
    spaced = json.dumps(event, indent=1).encode()
    header = hmac_header(OLD, spaced)
    assert verify(spaced, header, [OLD], now=NOW).event_id == "whe-abc123"
    compact = json.dumps(json.loads(spaced), separators=(",", ":")).encode()
    assert rejection(compact, header, [OLD]).reason == "bad_signature"


@pytest.mark.parametrize("offset", [301.0, 3600.0, 86_400.0])
def test_replay_older_than_the_window_is_stale(offset: float) -> None:
    body = event_body(sent=NOW - offset)
    error = rejection(body, hmac_header(OLD, body), [OLD])
    assert error.reason == "stale"
    assert "old" in error.message
    assert error.event_id == "whe-abc123"
    assert_clean(error)


@pytest.mark.parametrize("offset", [301.0, 7200.0])
def test_timestamp_far_in_the_future_is_stale(offset: float) -> None:
    body = event_body(sent=NOW + offset)
    error = rejection(body, hmac_header(OLD, body), [OLD])
    assert error.reason == "stale"
    assert "future" in error.message


@pytest.mark.parametrize("offset", [-300.0, -299.5, 0.0, 299.0, 300.0])
def test_timestamps_inside_the_window_are_accepted(offset: float) -> None:
    body = event_body(sent=NOW + offset)
    assert verify(body, hmac_header(OLD, body), [OLD], now=NOW).secret_index == 0


def test_tolerance_is_configurable() -> None:
    body = event_body(sent=NOW - 20)
    header = hmac_header(OLD, body)
    assert rejection(body, header, [OLD], tolerance=10).reason == "stale"
    assert verify(body, header, [OLD], now=NOW, tolerance=30).secret_index == 0


def test_now_defaults_to_the_wall_clock() -> None:
    body = event_body(sent=time.time())
    assert verify(body, hmac_header(OLD, body), [OLD]).secret_index == 0
    old = event_body(sent=time.time() - 400)
    with pytest.raises(SignatureError) as caught:
        verify(old, hmac_header(OLD, old), [OLD])
    assert caught.value.reason == "stale"


@pytest.mark.parametrize("header", [None, "", "   "])
def test_missing_header(header: str | None) -> None:
    error = rejection(event_body(), header, [OLD])
    assert error.reason == "missing_header"
    assert SIGNATURE_HEADER in error.message
    assert_clean(error)


@pytest.mark.parametrize(
    "header",
    [
        "sha256=abc",  # too short
        "sha256=" + "0" * 65,  # too long
        "sha256=" + "g" * 64,  # not hex
        "sha1=" + "0" * 64,  # wrong algorithm
        "0" * 64,  # no prefix
        "sha256 = " + "0" * 64,
        "sha256=" + "0" * 64 + ",sha256=" + "1" * 64,
        "sha256=é" + "0" * 63,
    ],
)
def test_malformed_header(header: str) -> None:
    error = rejection(event_body(), header, [OLD])
    assert error.reason == "malformed_header"
    assert "64 hex" in error.message
    assert_clean(error)


def test_header_hex_case_and_surrounding_space_are_tolerated() -> None:
    body = event_body()
    header = hmac_header(NEW, body)
    upper = "sha256=" + header.removeprefix("sha256=").upper()
    assert verify(body, f"  {upper} ", [OLD, NEW], now=NOW).secret_index == 1


def test_no_secrets_loaded() -> None:
    body = event_body()
    error = rejection(body, hmac_header(OLD, body), [])
    assert error.reason == "no_secrets"
    assert "secrets file" in error.message


@pytest.mark.parametrize(
    "body",
    [
        b"not json at all",
        b"\xff\xfe\x00garbage",
        b"[1, 2, 3]",
        b'"a string"',
        event_body(sent=None),
        event_body(sent=None, timestampSent="1800000000"),
        event_body(sent=None, timestampSent=True),
        event_body(sent=None, timestampSent=None),
    ],
    ids=["text", "binary", "array", "string", "no-timestamp", "str-ts", "bool-ts", "null-ts"],
)
def test_malformed_body_correctly_signed(body: bytes) -> None:
    error = rejection(body, hmac_header(OLD, body), [OLD])
    assert error.reason == "malformed_body"
    assert_clean(error)


def test_signature_is_checked_before_the_body_is_trusted() -> None:
    # an unsigned (wrongly signed) garbage body is a signature failure, not a body failure
    body = b"not json"
    assert rejection(body, hmac_header(WRONG, body), [OLD]).reason == "bad_signature"


def test_every_secret_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    body = event_body()
    # matching the first secret still compares against the others (no early exit)
    assert verify(body, hmac_header(OLD, body), [OLD, NEW, WRONG], now=NOW).secret_index == 0
    assert len(calls) == 3
    calls.clear()
    rejection(body, hmac_header(WRONG, body), [OLD, NEW])
    assert len(calls) == 2


def test_reasons_are_all_documented() -> None:
    assert set(REASONS) >= {
        "missing_header",
        "malformed_header",
        "no_secrets",
        "bad_signature",
        "malformed_body",
        "stale",
    }


def test_verified_repr_holds_no_secret_and_no_event_data() -> None:
    body = event_body()
    verified = verify(body, hmac_header(NEW, body), [OLD, NEW], now=NOW)
    text = repr(verified)
    assert "secret_index=1" in text
    assert "whe-abc123" in text
    assert scan_bytes(text, {"old": OLD, "new": NEW}) == []
    assert isinstance(verified, Verified)


# ---------------------------------------------------------------------------- WebhookVerifier


def test_verifier_finds_the_header_in_any_case() -> None:
    body = event_body(sent=NOW)
    header = hmac_header(NEW, body)
    verifier = WebhookVerifier([OLD, NEW], clock=lambda: NOW)
    for headers in (
        {SIGNATURE_HEADER: header},
        {"x-dfns-webhook-signature": header},
        {"X-Dfns-Webhook-Signature": header},
        Headers({"x-dfns-webhook-signature": header}),
    ):
        assert verifier.verify(body, headers).secret_index == 1
    with pytest.raises(SignatureError) as caught:
        verifier.verify(body, {"content-type": "application/json"})
    assert caught.value.reason == "missing_header"
    with pytest.raises(SignatureError):
        verifier.verify(body, None)


def test_verifier_uses_its_clock_and_tolerance() -> None:
    body = event_body(sent=NOW)
    headers = {SIGNATURE_HEADER: hmac_header(OLD, body)}
    assert WebhookVerifier([OLD], clock=lambda: NOW + 100).verify(body, headers)
    late = WebhookVerifier([OLD], clock=lambda: NOW + 100, tolerance=50)
    with pytest.raises(SignatureError) as caught:
        late.verify(body, headers)
    assert caught.value.reason == "stale"


def test_verifier_reads_a_callable_source_on_every_call() -> None:
    current = [OLD]
    verifier = WebhookVerifier(lambda: current, clock=lambda: NOW)
    body = event_body()
    headers = {SIGNATURE_HEADER: hmac_header(NEW, body)}
    with pytest.raises(SignatureError):
        verifier.verify(body, headers)
    current.append(NEW)
    assert verifier.verify(body, headers).secret_index == 1


def test_verifier_refuses_a_single_string_as_the_secret_list() -> None:
    with pytest.raises(TypeError, match="not a single string"):
        WebhookVerifier(OLD)


def test_verifier_repr_holds_no_secret() -> None:
    assert OLD not in repr(WebhookVerifier([OLD]))


# -------------------------------------------------------------------------------- SecretsFile


def write_secrets(path: Path, secrets: list[str]) -> str:
    """Replace the file atomically (as the deploy target does); its version."""
    version, content = render_secrets_document(secrets)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content)
    tmp.replace(path)
    return version


def age(path: Path, seconds: float = 10.0) -> None:
    """Make the file look older than the racy window (so unchanged stats mean unchanged)."""
    past = time.time() - seconds
    os.utime(path, (past, past))


def test_secrets_file_loads_the_set_and_its_version(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    version = write_secrets(path, [OLD, NEW])
    source = SecretsFile(path)
    assert source.secrets == (OLD, NEW)
    assert source.version == version == secrets_version([NEW, OLD])
    assert source.snapshot() == (version, (OLD, NEW))
    assert source.error is None


def test_secrets_file_picks_up_an_atomic_replace(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    write_secrets(path, [OLD])
    source = SecretsFile(path)
    assert source.secrets == (OLD,)
    both = write_secrets(path, [OLD, NEW])
    assert source.secrets == (OLD, NEW)
    assert source.version == both
    only_new = write_secrets(path, [NEW])
    assert source.version == only_new
    assert source.secrets == (NEW,)


def test_secrets_file_picks_up_an_in_place_rewrite_of_the_same_size(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    _, first = render_secrets_document([OLD], updated_at=None)
    path.write_bytes(first)
    source = SecretsFile(path)
    assert source.secrets == (OLD,)
    # same length, same inode, possibly the same coarse mtime: only the content differs
    second = first.replace(OLD.encode(), WRONG.encode())
    assert len(second) == len(first)
    with path.open("r+b") as handle:
        handle.write(second)
    deadline = time.monotonic() + 2.0
    while source.secrets != (WRONG,) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert source.secrets == (WRONG,)


def test_secrets_file_keeps_the_last_good_set_on_a_half_written_file(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    good = write_secrets(path, [OLD])
    source = SecretsFile(path)
    _, content = render_secrets_document([OLD, NEW])
    path.write_bytes(content[: len(content) // 2])  # a careless writer, caught mid-write
    assert source.secrets == (OLD,)
    assert source.version == good
    assert source.error is not None and "not valid JSON" in source.error
    path.write_bytes(content)  # the write completes
    deadline = time.monotonic() + 2.0
    while source.secrets != (OLD, NEW) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert source.secrets == (OLD, NEW)
    assert source.error is None


@pytest.mark.parametrize(
    "content",
    [b"", b"{}", b'{"secrets": "whs-x"}', b'{"secrets": [""]}', b'{"secrets": [1]}', b"[]"],
    ids=["empty", "no-list", "string", "empty-secret", "number", "array"],
)
def test_secrets_file_keeps_the_last_good_set_on_an_invalid_file(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "secrets.json"
    write_secrets(path, [OLD])
    source = SecretsFile(path)
    tmp = tmp_path / "next"
    tmp.write_bytes(content)
    tmp.replace(path)
    assert source.secrets == (OLD,)
    assert source.error is not None
    assert "\n" not in source.error


def test_secrets_file_keeps_the_last_good_set_while_the_file_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    write_secrets(path, [OLD])
    source = SecretsFile(path)
    path.unlink()
    assert source.secrets == (OLD,)
    assert source.error is not None and "does not exist" in source.error
    write_secrets(path, [NEW])
    assert source.secrets == (NEW,)
    assert source.error is None


def test_secrets_file_only_stats_when_nothing_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "secrets.json"
    write_secrets(path, [OLD])
    age(path)
    source = SecretsFile(path)
    reads: list[Path] = []
    real = Path.read_bytes

    def counting(self: Path) -> bytes:
        reads.append(self)
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    for _ in range(200):
        assert source.secrets == (OLD,)
    assert reads == []
    write_secrets(path, [NEW])
    assert source.secrets == (NEW,)
    assert len(reads) == 1


def test_reload_reads_the_file_even_if_its_stat_is_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    _, content = render_secrets_document([OLD])
    path.write_bytes(content)
    age(path)
    stat = path.stat()
    source = SecretsFile(path)
    with path.open("r+b") as handle:
        handle.write(content.replace(OLD.encode(), WRONG.encode()))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # hide the change from stat
    assert source.secrets == (OLD,)
    source.reload()
    assert source.secrets == (WRONG,)


def test_a_file_without_version_gets_the_computed_one(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps({"secrets": [NEW, OLD, NEW]}))
    source = SecretsFile(path)
    assert source.secrets == (NEW, OLD)  # duplicates dropped, order kept
    assert source.version == secrets_version([OLD, NEW])


def test_a_required_file_that_is_missing_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SecretsFileError) as caught:
        SecretsFile(tmp_path / "absent.json")
    message = str(caught.value)
    assert "does not exist" in message and "absent.json" in message
    assert "\n" not in message


def test_a_required_file_that_is_invalid_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    path.write_text('{"secrets": ["' + OLD + '", 5]}')
    with pytest.raises(SecretsFileError) as caught:
        SecretsFile(path)
    message = str(caught.value)
    assert "secret #2" in message
    assert OLD not in message


def test_an_optional_file_may_appear_later(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    source = SecretsFile(path, required=False)
    assert source.secrets == ()
    assert source.version is None
    assert source.error is not None and "does not exist" in source.error
    version = write_secrets(path, [OLD])
    assert source.secrets == (OLD,)
    assert source.version == version


def test_secrets_file_repr_holds_no_secret(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    version = write_secrets(path, [OLD, NEW])
    text = repr(SecretsFile(path))
    assert version in text and "secrets=2" in text
    assert scan_bytes(text, {"old": OLD, "new": NEW}) == []


def test_secrets_version_ignores_order_and_duplicates() -> None:
    assert secrets_version([OLD, NEW]) == secrets_version([NEW, OLD, OLD])
    assert secrets_version([OLD]) != secrets_version([NEW])
    assert len(secrets_version([OLD])) == 16
    canonical = json.dumps(sorted([OLD, NEW]), separators=(",", ":")).encode()
    assert secrets_version([NEW, OLD]) == hashlib.sha256(canonical).hexdigest()[:16]

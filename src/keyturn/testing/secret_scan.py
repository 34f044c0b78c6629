"""Find secrets where they must not be: in files, logs, databases, process output.

A secret rarely leaks byte for byte. :func:`variants` expands one secret into the forms it is
likely to take once serialized: for a PEM key its DER body and raw private scalar or seed, and
for every form its base64 (standard and URL-safe, padded or not, and at each of the three byte
alignments it can have inside a longer base64 stream) and hex (lower and upper case), plus a
PEM with CRLF line ends or JSON-escaped newlines. Forms shorter than 16 bytes are dropped: they
would match random data.

Findings name the secret (by the name the caller gave it), the kind of variant, the file and the
offset; they never contain the secret or any variant of it.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

MIN_VARIANT_BYTES: Final = 16

_PEM_RE: Final = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)\s*-----END \1-----", re.DOTALL)


@dataclass(frozen=True)
class Finding:
    """One place a secret was found. Holds names and positions only, never secret bytes."""

    secret: str  # the caller's name for the secret
    kind: str  # e.g. "exact", "der", "base64url-nopad of raw-seed"
    path: Path | None  # None for scan_bytes
    offset: int

    def __str__(self) -> str:
        where = str(self.path) if self.path is not None else "the scanned data"
        return f"secret {self.secret!r} found as {self.kind} in {where} at offset {self.offset}"


def _to_bytes(secret: bytes | str) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)


def _int_bytes(value: int, size: int | None = None) -> bytes:
    length = size if size is not None else max(1, (value.bit_length() + 7) // 8)
    return value.to_bytes(length, "big")


def _key_forms(secret: bytes) -> dict[str, bytes]:
    """DER and raw forms of the PEM keys inside `secret` (empty if there are none)."""
    forms: dict[str, bytes] = {}
    blocks = list(_PEM_RE.finditer(secret))
    for index, block in enumerate(blocks):
        suffix = "" if len(blocks) == 1 else f"#{index + 1}"
        label = block.group(1)
        body = re.sub(rb"\s+", b"", block.group(2))
        try:
            der = base64.b64decode(body, validate=True)
        except ValueError:
            continue
        forms[f"der{suffix}"] = der
        if label.endswith(b"PRIVATE KEY"):
            try:
                key = serialization.load_pem_private_key(block.group(0), password=None)
            except (ValueError, TypeError):
                continue
            forms[f"pkcs8-der{suffix}"] = key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            if isinstance(key, ed25519.Ed25519PrivateKey):
                seed = key.private_bytes(
                    serialization.Encoding.Raw,
                    serialization.PrivateFormat.Raw,
                    serialization.NoEncryption(),
                )
                public = key.public_key().public_bytes(
                    serialization.Encoding.Raw, serialization.PublicFormat.Raw
                )
                forms[f"raw-seed{suffix}"] = seed
                forms[f"raw-seed+public{suffix}"] = seed + public  # NaCl's 64-byte secret key
            elif isinstance(key, ec.EllipticCurvePrivateKey):
                size = (key.curve.key_size + 7) // 8
                forms[f"raw-scalar{suffix}"] = _int_bytes(key.private_numbers().private_value, size)
                forms[f"traditional-der{suffix}"] = key.private_bytes(
                    serialization.Encoding.DER,
                    serialization.PrivateFormat.TraditionalOpenSSL,
                    serialization.NoEncryption(),
                )
            elif isinstance(key, rsa.RSAPrivateKey):
                numbers = key.private_numbers()
                forms[f"rsa-d{suffix}"] = _int_bytes(numbers.d)
                forms[f"rsa-p{suffix}"] = _int_bytes(numbers.p)
                forms[f"rsa-q{suffix}"] = _int_bytes(numbers.q)
                forms[f"traditional-der{suffix}"] = key.private_bytes(
                    serialization.Encoding.DER,
                    serialization.PrivateFormat.TraditionalOpenSSL,
                    serialization.NoEncryption(),
                )
        elif label == b"PUBLIC KEY":
            try:
                public_key = serialization.load_pem_public_key(block.group(0))
            except (ValueError, TypeError):
                continue
            if isinstance(public_key, ed25519.Ed25519PublicKey):
                forms[f"raw-public{suffix}"] = public_key.public_bytes(
                    serialization.Encoding.Raw, serialization.PublicFormat.Raw
                )
            elif isinstance(public_key, ec.EllipticCurvePublicKey):
                forms[f"raw-public{suffix}"] = public_key.public_bytes(
                    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
                )
    return forms


def _shifted_base64(data: bytes, shift: int, urlsafe: bool) -> bytes:
    """The part of base64(data) that does not depend on what precedes or follows it, when
    `data` starts `shift` bytes (mod 3) into a longer base64-encoded stream."""
    encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
    encoded = encode(b"\0" * shift + data)
    head = 4 if shift else 0  # the first quantum mixes in the preceding bytes
    full = (shift + len(data)) // 3  # quanta made of our bytes only (the last may mix)
    return encoded[head : 4 * full]


def _encodings(form: bytes) -> Iterator[tuple[str, bytes]]:
    yield "", form
    std = base64.b64encode(form)
    url = base64.urlsafe_b64encode(form)
    yield "base64", std
    yield "base64-nopad", std.rstrip(b"=")
    yield "base64url", url
    yield "base64url-nopad", url.rstrip(b"=")
    for shift in (0, 1, 2):
        yield f"base64@{shift}", _shifted_base64(form, shift, urlsafe=False)
        yield f"base64url@{shift}", _shifted_base64(form, shift, urlsafe=True)
    hexed = form.hex().encode("ascii")
    yield "hex", hexed
    yield "HEX", hexed.upper()


def variant_kinds(secret: bytes | str) -> dict[bytes, str]:
    """Every variant (at least 16 bytes) of `secret`, mapped to a name for its kind."""
    raw = _to_bytes(secret)
    forms: dict[str, bytes] = {"exact": raw}
    if b"\n" in raw:
        forms["crlf"] = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        forms["json-escaped"] = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\\n")
    forms.update(_key_forms(raw))
    result: dict[bytes, str] = {}
    for form_name, form in forms.items():
        for encoding, value in _encodings(form):
            if len(value) < MIN_VARIANT_BYTES:
                continue
            kind = f"{encoding} of {form_name}" if encoding else form_name
            result.setdefault(value, kind)
    return result


def variants(secret: bytes | str) -> set[bytes]:
    """The exact bytes and the encoded, DER and raw-key forms of `secret` (each >= 16 bytes)."""
    return set(variant_kinds(secret))


def _compile(secrets: Mapping[str, bytes | str]) -> list[tuple[str, str, bytes]]:
    compiled: list[tuple[str, str, bytes]] = []
    for name, secret in secrets.items():
        for value, kind in variant_kinds(secret).items():
            compiled.append((name, kind, value))
    return compiled


def _scan(data: bytes, compiled: list[tuple[str, str, bytes]], path: Path | None) -> list[Finding]:
    findings: list[Finding] = []
    for name, kind, value in compiled:
        offset = data.find(value)
        if offset >= 0:
            findings.append(Finding(secret=name, kind=kind, path=path, offset=offset))
    return findings


def scan_bytes(data: bytes | str, secrets: Mapping[str, bytes | str]) -> list[Finding]:
    """Findings of any named secret (in any variant) inside `data`."""
    return _scan(_to_bytes(data), _compile(secrets), None)


def scan_json(documents: Iterable[object], secrets: Mapping[str, bytes | str]) -> list[Finding]:
    """Findings of any named secret inside JSON documents (API responses, notification
    payloads, outbox rows as dicts), serialized compactly and with ASCII escapes both, since a
    leak may sit in either form; values JSON cannot hold (datetimes, bytes) as their text."""
    compiled = _compile(secrets)
    findings: list[Finding] = []
    for doc in documents:
        for ascii_only in (False, True):
            text = json.dumps(doc, default=str, ensure_ascii=ascii_only, separators=(",", ":"))
            findings.extend(_scan(text.encode(), compiled, None))
    return findings


def _files(paths: Iterable[Path]) -> Iterator[Path]:
    for given in paths:
        path = Path(given)
        if path.is_symlink():
            continue
        if path.is_dir():
            for root, dirs, names in os.walk(path, followlinks=False):
                dirs.sort()
                for file_name in sorted(names):
                    candidate = Path(root) / file_name
                    if candidate.is_file() and not candidate.is_symlink():
                        yield candidate
        elif path.is_file():
            yield path
        elif not path.exists():
            raise FileNotFoundError(f"cannot scan {path}: it does not exist")


def scan_paths(paths: Iterable[Path], secrets: Mapping[str, bytes | str]) -> list[Finding]:
    """Walk `paths` (files, and directories recursively; symlinks are not followed) and report
    every file holding any variant of any named secret. A file that vanishes mid-scan (a
    database journal) is skipped."""
    compiled = _compile(secrets)
    findings: list[Finding] = []
    for path in _files(paths):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        findings.extend(_scan(data, compiled, path))
    return findings


def describe(findings: Iterable[Finding]) -> str:
    """One line per finding (safe to print: no secret material)."""
    return "\n".join(str(f) for f in findings)


def assert_no_secrets(paths: Iterable[Path], secrets: Mapping[str, bytes | str]) -> None:
    """Raise AssertionError listing the findings if any named secret is in `paths`."""
    findings = scan_paths(paths, secrets)
    if findings:
        raise AssertionError(f"{len(findings)} secret leak(s) found:\n{describe(findings)}")

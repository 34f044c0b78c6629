"""How a signing key and its credential ids are stored in a remote secret store (AWS Secrets
Manager, Vault KV, a command's stdin): one JSON document, the same everywhere, and the marks
that say keyturn manages a secret.

Document: ``{"private_key": "<PEM>", "credential_id": "...", "credential_uuid": "..."}``.
A holder parses it with any JSON library; :func:`material_from_document` is keyturn's reader.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from typing import Any, Final

from keyturn.domain.errors import KeyturnError
from keyturn.ports import DeployedMaterial

#: The mark's key and value (an AWS tag, Vault custom metadata) on every secret keyturn manages.
MANAGED_BY_KEY: Final = "managed-by"
MANAGED_BY: Final = "keyturn"
#: The mark naming the managed credential.
CREDENTIAL_KEY: Final = "keyturn-credential"

_NAMESPACE: Final = uuid.UUID("5b0f6d1e-8a37-4c51-9a57-6b2f0c1d7e42")


def material_document(material: DeployedMaterial) -> dict[str, str]:
    return {
        "private_key": material.private_key_pem.decode("ascii"),
        "credential_id": material.credential_id,
        "credential_uuid": material.credential_uuid,
    }


def material_json(material: DeployedMaterial) -> str:
    return json.dumps(material_document(material), separators=(",", ":"), sort_keys=True)


def material_from_document(document: Any, where: str) -> DeployedMaterial:
    """The material in a stored document (a dict or its JSON text); KeyturnError naming `where`
    (never the content) when it is not one."""
    if isinstance(document, str | bytes):
        try:
            document = json.loads(document)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise KeyturnError(f"{where} is not keyturn's JSON key document") from None
    if not isinstance(document, Mapping):
        raise KeyturnError(f"{where} is not keyturn's JSON key document")
    fields = ("private_key", "credential_id", "credential_uuid")
    missing = [f for f in fields if not isinstance(document.get(f), str)]
    if missing:
        raise KeyturnError(f"{where} lacks {', '.join(missing)} (not keyturn's key document)")
    return DeployedMaterial(
        document["private_key"].encode("ascii"),
        document["credential_id"],
        document["credential_uuid"],
    )


def same_material(a: DeployedMaterial | None, b: DeployedMaterial | None) -> bool:
    if a is None or b is None:
        return a is b
    return (
        a.private_key_pem.strip() == b.private_key_pem.strip()
        and a.credential_id == b.credential_id
        and a.credential_uuid == b.credential_uuid
    )


def content_id(material: DeployedMaterial) -> str:
    """A short, non-secret id of the content (a version directory's name): a hash over the
    key and ids, not reversible."""
    digest = hashlib.sha256(material_json(material).encode()).hexdigest()
    return digest[:16]


def request_token(rotation_id: str, phase: str) -> str:
    """A stable idempotency token for one rotation's write (36 characters, a UUID): the same
    rotation and phase always give the same token."""
    return str(uuid.uuid5(_NAMESPACE, f"{rotation_id}/{phase}"))

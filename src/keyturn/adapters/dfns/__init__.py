"""The Dfns adapter: an async httpx client with user-action signing, and the KeyProvider on it.

Public API: :class:`DfnsClient`, :class:`KeySigner`, :class:`DfnsKeyProvider`,
:func:`provider_for`, the typed results in :mod:`.models` and the errors in :mod:`.errors`.
"""

from keyturn.adapters.dfns.client import AssertionRelay, DfnsClient
from keyturn.adapters.dfns.errors import (
    CredentialNotAllowed,
    DfnsApiError,
    DfnsBadResponse,
    DfnsConnectionError,
    DfnsError,
    DfnsRateLimited,
    DfnsTimeout,
    InvalidRequest,
    InvalidSigningKey,
    MissingSigner,
    PolicyPending,
)
from keyturn.adapters.dfns.models import (
    Credential,
    CredentialChallenge,
    CredentialCode,
    DelegatedToken,
    PingResult,
    UserActionChallenge,
    Webhook,
    WebhookEvent,
    WebhookEventPage,
    WebhookSecret,
)
from keyturn.adapters.dfns.provider import DfnsKeyProvider, provider_for
from keyturn.adapters.dfns.signing import KeySigner, new_credential_id

__all__ = [
    "AssertionRelay",
    "Credential",
    "CredentialChallenge",
    "CredentialCode",
    "CredentialNotAllowed",
    "DelegatedToken",
    "DfnsApiError",
    "DfnsBadResponse",
    "DfnsClient",
    "DfnsConnectionError",
    "DfnsError",
    "DfnsKeyProvider",
    "DfnsRateLimited",
    "DfnsTimeout",
    "InvalidRequest",
    "InvalidSigningKey",
    "KeySigner",
    "MissingSigner",
    "PingResult",
    "PolicyPending",
    "UserActionChallenge",
    "Webhook",
    "WebhookEvent",
    "WebhookEventPage",
    "WebhookSecret",
    "new_credential_id",
    "provider_for",
]

"""Public testing helpers: run the sandbox as a real subprocess and talk to it.

    with start_sandbox(tmp_path) as sandbox:
        token = sandbox.bootstrap["service_account"]["token"]
        sandbox.set_faults(error_rate=0.5)
        client = sandbox.client("service_account")   # a minimal signing client
        client.request("GET", "/auth/credentials")

The process is `sys.executable -m keyturn.sandbox serve ...` on a free port (chosen by the
sandbox itself, so parallel test workers never race for one); its stderr goes to
`<state_dir>/sandbox.log`.

Passkeys: ``start_sandbox(tmp_path / "sb", end_users=2)`` bootstraps two end users with one
passkey each; ``sandbox.authenticator()`` loads the device that holds them (its state file lies
next to the state dir, never in it), ``sandbox.delegated_login(username)`` logs one in, and
``sandbox.passkey_client(token, device)`` signs that user's actions with the device.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from keyturn.sandbox.crypto import b64url_encode

if TYPE_CHECKING:
    from keyturn.testing.authenticator import SoftwareAuthenticator

__all__ = [
    "PasskeyClient",
    "SandboxClient",
    "SandboxError",
    "SandboxProcess",
    "key_attestation",
    "sign_bytes",
    "start_sandbox",
]

STARTUP_TIMEOUT = 20.0


class SandboxError(RuntimeError):
    """The sandbox process did not start or answer (message ends with its stderr tail)."""


class SandboxProcess:
    """A sandbox subprocess; see :func:`start_sandbox`."""

    def __init__(
        self,
        state_dir: Path,
        *,
        port: int | None = None,
        service_accounts: int = 1,
        event_rate: float = 0,
        time_scale: float = 1.0,
        extra_args: Sequence[str] = (),
        end_users: int = 0,
        authenticator_state: Path | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.port = port
        self.service_accounts = service_accounts
        self.event_rate = event_rate
        self.time_scale = time_scale
        self.extra_args = list(extra_args)
        self.end_users = end_users
        if authenticator_state is None and end_users:
            authenticator_state = (
                self.state_dir.parent / f"{self.state_dir.name}-authenticator.json"
            )
        self.authenticator_state = authenticator_state
        self.bootstrap: dict[str, Any] = {}
        self._proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------------------ process

    @property
    def log_path(self) -> Path:
        return self.state_dir / "sandbox.log"

    @property
    def bootstrap_path(self) -> Path:
        return self.state_dir / "bootstrap.json"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise SandboxError("the sandbox is not running; call start() or restart()")
        return self._proc.pid

    @property
    def base_url(self) -> str:
        return str(self.bootstrap["base_url"])

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "keyturn.sandbox",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port or 0),
            "--state-dir",
            str(self.state_dir),
            "--service-accounts",
            str(self.service_accounts),
            "--event-rate",
            str(self.event_rate),
            "--time-scale",
            str(self.time_scale),
            *(["--end-users", str(self.end_users)] if self.end_users else []),
            *(
                ["--authenticator-state", str(self.authenticator_state)]
                if self.authenticator_state is not None
                else []
            ),
            *self.extra_args,
        ]

    def start(self) -> SandboxProcess:
        if self.running:
            raise SandboxError("the sandbox is already running; stop() it first")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise SandboxError(
                    f"the sandbox exited with code {self._proc.returncode} during startup;"
                    f" its log ends with: {self.log_tail()}"
                )
            document = self._read_bootstrap()
            if document is not None and document.get("pid") == self._proc.pid:
                self.bootstrap = document
                self.port = int(str(document["base_url"]).rsplit(":", 1)[1])
                return self
            time.sleep(0.02)
        self.kill()
        raise SandboxError(
            f"the sandbox wrote no bootstrap.json within {STARTUP_TIMEOUT:.0f} s;"
            f" its log ends with: {self.log_tail()}"
        )

    def _read_bootstrap(self) -> dict[str, Any] | None:
        try:
            document = json.loads(self.bootstrap_path.read_text())
        except (OSError, ValueError):
            return None
        return document if isinstance(document, dict) else None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        tail = [line for line in text.splitlines() if line.strip()][-lines:]
        return " | ".join(tail) if tail else "(empty log)"

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait (SIGKILL after `timeout`); the exit code, None if not running."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL, no chance to clean up (a crash)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self) -> SandboxProcess:
        """Stop if running, then start again on the same port with the same state."""
        self.stop()
        return self.start()

    def __enter__(self) -> SandboxProcess:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -------------------------------------------------------------------------- control API

    def _control(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = httpx.request(method, self.base_url + path, json=body, timeout=10.0)
        except httpx.HTTPError as exc:
            raise SandboxError(
                f"the sandbox at {self.base_url} did not answer {method} {path}: {exc};"
                f" its log ends with: {self.log_tail()}"
            ) from None
        data = response.json()
        if response.status_code != 200:
            raise SandboxError(f"{method} {path} failed: {data['error']['message']}")
        return data

    def set_faults(self, **fields: Any) -> dict[str, Any]:
        """Replace the given fault fields (snake_case, e.g. error_rate=0.2); the new config."""
        result: dict[str, Any] = self._control("PUT", "/_sandbox/faults", fields)
        return result

    def faults(self) -> dict[str, Any]:
        result: dict[str, Any] = self._control("GET", "/_sandbox/faults")
        return result

    def set_event_rate(self, rate: float) -> float:
        """Synthetic webhook events per second from now on (0 stops them)."""
        return float(self._control("PUT", "/_sandbox/events/rate", {"rate": rate})["rate"])

    def clear_faults(self) -> dict[str, Any]:
        return self.set_faults(
            latency_ms=0,
            error_rate=0,
            rate_429=0,
            hang_rate=0,
            rate_limit_per_minute=0,
            apply_then_fail_rate=0,
            paths=[],
        )

    def state(self, *, events: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = self._control(
            "GET", "/_sandbox/state" + ("?events=1" if events else "")
        )
        return result

    def emit(self, kind: str = "wallet.created", data: dict[str, Any] | None = None) -> int:
        """Send one event to every enabled webhook that wants `kind`; how many were queued."""
        result = self._control("POST", "/_sandbox/events", {"kind": kind, "data": data or {}})
        return int(result["queued"])

    def relying_parties(self) -> dict[str, Any]:
        """The organisation's allowed WebAuthn origins, rpIds and user verification."""
        result: dict[str, Any] = self._control("GET", "/_sandbox/relying-parties")
        return result

    def set_relying_parties(
        self,
        *,
        origins: Sequence[str] | None = None,
        rp_ids: Sequence[str] | None = None,
        user_verification: str | None = None,
    ) -> dict[str, Any]:
        """Replace the given WebAuthn settings (SandboxError with the reason if refused)."""
        body: dict[str, Any] = {}
        if origins is not None:
            body["origins"] = list(origins)
        if rp_ids is not None:
            body["rpIds"] = list(rp_ids)
        if user_verification is not None:
            body["userVerification"] = user_verification
        result: dict[str, Any] = self._control("PUT", "/_sandbox/relying-parties", body)
        return result

    def authenticator(self) -> SoftwareAuthenticator:
        """The software authenticator holding the bootstrap end users' passkeys."""
        from keyturn.testing.authenticator import SoftwareAuthenticator

        if self.authenticator_state is None:
            raise SandboxError("this sandbox has no end users; start it with end_users=N")
        return SoftwareAuthenticator.load(self.authenticator_state)

    def end_user(self, index: int = 0) -> dict[str, Any]:
        """The bootstrap entry of an end user: username, user_id, credential_id/uuid, rp_id."""
        users: list[dict[str, Any]] = self.bootstrap.get("end_users", [])
        return users[index]

    def delegated_login(self, username: str, role: str = "service_account") -> str:
        """A Delegated Login token for `username`, signed by a service account."""
        with self.client(role) as sa:
            response = sa.request(
                "POST", "/auth/login/delegated", {"username": username}, sign=True
            )
        if response.status_code != 200:
            raise SandboxError(f"delegated login answered {response.status_code}: {response.text}")
        return str(response.json()["token"])

    def passkey_client(
        self, token: str, device: SoftwareAuthenticator, origin: str | None = None, **options: Any
    ) -> PasskeyClient:
        """A client acting as an end user (`token` from delegated_login) signing with `device`."""
        chosen = origin or str(self.bootstrap.get("end_users", [{}])[0].get("origin", ""))
        return PasskeyClient(self.base_url, token, device, chosen, **options)

    def client(self, role: str = "service_account", *, timeout: float = 10.0) -> SandboxClient:
        """A signing client for a bootstrap principal: "service_account", "pat" or "user"."""
        entry = self.bootstrap[role]
        return SandboxClient(
            self.base_url,
            entry["token"],
            entry["credential_id"],
            entry["private_key_pem"].encode(),
            timeout=timeout,
        )


def start_sandbox(
    state_dir: Path,
    *,
    port: int | None = None,
    service_accounts: int = 1,
    event_rate: float = 0,
    time_scale: float = 1.0,
    extra_args: Sequence[str] = (),
    end_users: int = 0,
    authenticator_state: Path | None = None,
) -> SandboxProcess:
    """Start a sandbox subprocess and wait until it serves (bootstrap.json written)."""
    return SandboxProcess(
        state_dir,
        port=port,
        service_accounts=service_accounts,
        event_rate=event_rate,
        time_scale=time_scale,
        extra_args=extra_args,
        end_users=end_users,
        authenticator_state=authenticator_state,
    ).start()


# ---------------------------------------------------------------------------- signing client


def sign_bytes(private_key_pem: bytes, data: bytes) -> bytes:
    """Sign as Dfns Key credentials do: Ed25519 raw, ECDSA DER/SHA-256, RSA PKCS#1 v1.5."""
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(data)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    raise ValueError("unsupported private key type; use Ed25519, ECDSA or RSA")


def key_attestation(challenge: str, private_key_pem: bytes) -> tuple[str, str]:
    """(clientData b64url, attestationData b64url) proving possession of a NEW key."""
    key = serialization.load_pem_private_key(private_key_pem, password=None)
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    client_data = json.dumps(
        {
            "challenge": challenge,
            "crossOrigin": False,
            "origin": "http://localhost",
            "type": "key.create",
        },
        separators=(",", ":"),
    ).encode()
    fingerprint = json.dumps(
        {"clientDataHash": hashlib.sha256(client_data).hexdigest(), "publicKey": public_pem},
        separators=(",", ":"),
    ).encode()
    attestation = {
        "publicKey": public_pem,
        "signature": sign_bytes(private_key_pem, fingerprint).hex(),
    }
    return b64url_encode(client_data), b64url_encode(json.dumps(attestation).encode())


class SandboxClient:
    """A minimal synchronous Dfns client for tests: bearer token plus user-action signing."""

    def __init__(
        self,
        base_url: str,
        token: str,
        credential_id: str,
        private_key_pem: bytes,
        *,
        timeout: float = 10.0,
    ) -> None:
        self.base_url = base_url
        self.credential_id = credential_id
        self._private_key_pem = private_key_pem
        self._http = httpx.Client(
            base_url=base_url, timeout=timeout, headers={"Authorization": f"Bearer {token}"}
        )

    def __repr__(self) -> str:
        return f"SandboxClient(base_url={self.base_url!r}, credential_id={self.credential_id!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SandboxClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def with_key(self, credential_id: str, private_key_pem: bytes) -> SandboxClient:
        """The same caller signing with another credential."""
        token = self._http.headers["Authorization"].removeprefix("Bearer ")
        return SandboxClient(self.base_url, token, credential_id, private_key_pem)

    def assertion(self, challenge: dict[str, Any]) -> dict[str, Any]:
        client_data = json.dumps(
            {"type": "key.get", "challenge": challenge["challenge"]}, separators=(",", ":")
        ).encode()
        return {
            "kind": "Key",
            "credentialAssertion": {
                "credId": self.credential_id,
                "clientData": b64url_encode(client_data),
                "signature": b64url_encode(sign_bytes(self._private_key_pem, client_data)),
            },
        }

    def user_action(self, method: str, path: str, payload: str) -> str:
        """Init + sign + /auth/action; the user-action token (SandboxError if refused)."""
        init = self._http.post(
            "/auth/action/init",
            json={
                "userActionPayload": payload,
                "userActionHttpMethod": method,
                "userActionHttpPath": path,
                "userActionServerKind": "Api",
            },
        )
        if init.status_code != 200:
            raise SandboxError(f"/auth/action/init answered {init.status_code}: {init.text}")
        challenge = init.json()
        signed = self._http.post(
            "/auth/action",
            json={
                "challengeIdentifier": challenge["challengeIdentifier"],
                "firstFactor": self.assertion(challenge),
            },
        )
        if signed.status_code != 200:
            raise SandboxError(f"/auth/action answered {signed.status_code}: {signed.text}")
        return str(signed.json()["userAction"])

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        sign: bool = False,
        user_action: str | None = None,
    ) -> httpx.Response:
        """Send `body` as compact JSON (signed first when `sign`); the raw response."""
        content = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json"}
        if sign:
            user_action = self.user_action(method, path, content.decode())
        if user_action is not None:
            headers["X-DFNS-USERACTION"] = user_action
        return self._http.request(method, path, content=content, headers=headers)

    def create_key_credential(
        self, private_key_pem: bytes, credential_id: str, name: str = "test key"
    ) -> httpx.Response:
        """Create Credential (Key kind) for a new key, signed by this client's key."""
        init = self._http.post("/auth/credentials/init", json={"kind": "Key"})
        if init.status_code != 200:
            raise SandboxError(f"/auth/credentials/init answered {init.status_code}: {init.text}")
        challenge = init.json()
        client_data, attestation = key_attestation(challenge["challenge"], private_key_pem)
        body = {
            "challengeIdentifier": challenge["challengeIdentifier"],
            "credentialName": name,
            "credentialKind": "Key",
            "credentialInfo": {
                "credId": credential_id,
                "clientData": client_data,
                "attestationData": attestation,
            },
        }
        return self.request("POST", "/auth/credentials", body, sign=True)


class PasskeyClient(SandboxClient):
    """A SandboxClient acting as an end user whose user actions a passkey signs (Fido2)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        device: SoftwareAuthenticator,
        origin: str,
        *,
        timeout: float = 10.0,
        **options: Any,
    ) -> None:
        super().__init__(base_url, token, "", b"", timeout=timeout)
        self.device = device
        self.origin = origin
        #: passed to device.first_factor (credential_id=, challenge_encoding=, ...)
        self.options = options

    def __repr__(self) -> str:
        return f"PasskeyClient(base_url={self.base_url!r}, origin={self.origin!r})"

    def assertion(self, challenge: dict[str, Any]) -> dict[str, Any]:
        return self.device.first_factor(challenge, origin=self.origin, **self.options)

    def fido2_challenge(self) -> dict[str, Any]:
        init = self._http.post("/auth/credentials/init", json={"kind": "Fido2"})
        if init.status_code != 200:
            raise SandboxError(f"/auth/credentials/init answered {init.status_code}: {init.text}")
        return dict(init.json())

    def create_passkey(
        self, device: SoftwareAuthenticator, origin: str, name: str = "passkey", **options: Any
    ) -> httpx.Response:
        """Create Credential (Fido2) for a new passkey made by `device` at `origin`, signed by
        this client's passkey. `options` go to device.make_credential."""
        challenge = self.fido2_challenge()
        info = device.make_credential(
            rp_id=options.pop("rp_id", challenge["rp"]["id"]),
            origin=origin,
            challenge=challenge["challenge"],
            user_id=challenge["user"]["id"],
            user_name=challenge["user"]["name"],
            **options,
        )
        body = {
            "challengeIdentifier": challenge["challengeIdentifier"],
            "credentialName": name,
            "credentialKind": "Fido2",
            "credentialInfo": info,
        }
        return self.request("POST", "/auth/credentials", body, sign=True)

"""A demo holder of a Dfns signing key: a service that signs with the key keyturn deploys to a
``file`` target and tells keyturn's ``http`` probe which key that is.

    python -m keyturn.holders_demo --key-dir DIR --port 8080 \\
        --base-url http://127.0.0.1:8900 --token-file token.txt [--sign-every 1]

Every ``--sign-every`` seconds it takes the key in DIR (reloaded when the files change) and
signs a harmless Dfns user action with it (init + sign + /auth/action, no effect at the
provider). ``GET /.well-known/keyturn-holder`` answers the holder JSON of
:mod:`keyturn.holders` plus ``last_signed_ok_at`` (ISO time of the last accepted signature, or
null), ``last_signed_fingerprint`` (the key it was made with), ``last_error`` (why the latest
attempt failed, null when it succeeded) and ``signed_ok`` (a count). The token is read from a
file, never from the command line. ``--port 0`` picks a free port; the first line on stdout
names the URL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette

from keyturn.adapters.command import scrub
from keyturn.adapters.dfns import DfnsKeyProvider, provider_for
from keyturn.holders import DEFAULT_PATH, HeldKey, starlette_routes
from keyturn.ports import SigningKey


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


class Signer:
    """Signs with the held key every `every` seconds and remembers how that went."""

    def __init__(self, held: HeldKey, provider: DfnsKeyProvider, every: float) -> None:
        self.held = held
        self.provider = provider
        self.every = every
        self.last_signed_ok_at: datetime | None = None
        self.last_signed_fingerprint: str | None = None
        self.last_error: str | None = None
        self.signed_ok = 0

    async def sign_once(self) -> None:
        try:
            key = await asyncio.to_thread(self.held.current)
            await self.provider.prove(signer=SigningKey(key.credential_id, key.private_key_pem))
        except Exception as exc:  # the demo keeps running and says why
            self.last_error = scrub(f"{type(exc).__name__}: {exc}")
            return
        self.last_signed_ok_at = datetime.now(UTC)
        self.last_signed_fingerprint = key.fingerprint
        self.last_error = None
        self.signed_ok += 1

    async def run(self) -> None:
        while True:
            await self.sign_once()
            await asyncio.sleep(self.every)

    def extra(self) -> dict[str, Any]:
        return {
            "last_signed_ok_at": _iso(self.last_signed_ok_at),
            "last_signed_fingerprint": self.last_signed_fingerprint,
            "last_error": self.last_error,
            "signed_ok": self.signed_ok,
        }


def build_app(
    key_dir: Path, base_url: str, token: str, *, every: float = 1.0, path: str = DEFAULT_PATH
) -> Starlette:
    held = HeldKey(key_dir)
    provider = provider_for(base_url, token)
    signer = Signer(held, provider, every)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(signer.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await provider.aclose()

    return Starlette(routes=starlette_routes(held, path, extra=signer.extra), lifespan=lifespan)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m keyturn.holders_demo",
        description="A demo service holding a Dfns signing key that keyturn rotates.",
    )
    parser.add_argument("--key-dir", type=Path, required=True, help="a file target's directory")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--base-url", required=True, help="the Dfns API (or sandbox) URL")
    parser.add_argument("--token-file", type=Path, required=True, help="the bearer token's file")
    parser.add_argument("--sign-every", type=float, default=1.0, help="seconds (default 1)")
    parser.add_argument("--path", default=DEFAULT_PATH, help="the holder route")
    args = parser.parse_args(argv)
    if args.sign_every <= 0:
        parser.error("--sign-every must be more than 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    try:
        token = args.token_file.read_text().strip()
    except OSError as exc:
        print(f"cannot read --token-file {args.token_file} ({exc.strerror})", file=sys.stderr)
        return 2
    app = build_app(args.key_dir, args.base_url, token, every=args.sign_every, path=args.path)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    host, port = sock.getsockname()[:2]
    print(f"holder demo listening on http://{host}:{port}{args.path}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m keyturn.sandbox serve ...` (mounted by the main CLI as `keyturn sandbox`)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Annotated

import typer

from keyturn.sandbox.faults import FaultConfig, FaultConfigError

app = typer.Typer(
    help="A local Dfns-compatible API sandbox with fault injection.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """A local Dfns-compatible API sandbox with fault injection."""


def _cannot_listen(host: str, port: int) -> str | None:
    """Why the sandbox could not listen on host:port (one line), or None."""
    import socket

    if not 0 <= port <= 65535:
        return f"--port {port} is not a TCP port; use 1-65535, or 0 for a free one"
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        return (
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --host or --port"
        )
    return None


@app.command()
def serve(
    state_dir: Annotated[
        Path, typer.Option(help="Directory for the sandbox's state and bootstrap.json.")
    ],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one.")] = 0,
    service_accounts: Annotated[
        int, typer.Option(help="Service accounts to create on first start.")
    ] = 1,
    event_rate: Annotated[
        float, typer.Option(help="Synthetic webhook events per second (0: none).")
    ] = 0.0,
    time_scale: Annotated[
        float, typer.Option(help="Divide webhook retry delays by this factor.")
    ] = 1.0,
    latency_ms: Annotated[float, typer.Option(help="Latency added to every request.")] = 0.0,
    error_rate: Annotated[float, typer.Option(help="Share answered 500, no effect.")] = 0.0,
    rate_429: Annotated[float, typer.Option(help="Share answered 429, no effect.")] = 0.0,
    hang_rate: Annotated[float, typer.Option(help="Share that hangs, then 500.")] = 0.0,
    hang_seconds: Annotated[float, typer.Option(help="How long a hang lasts.")] = 30.0,
    rate_limit_per_minute: Annotated[
        int, typer.Option(help="Requests per minute per organisation (0: no limit).")
    ] = 0,
    apply_then_fail_rate: Annotated[
        float, typer.Option(help="Share of state changes applied, then failed.")
    ] = 0.0,
    apply_then_fail_mode: Annotated[
        str, typer.Option(help='"500" (error response) or "drop" (connection closed).')
    ] = "500",
    fault_path: Annotated[
        list[str] | None,
        typer.Option(help='Restrict faults to a route, e.g. "POST /auth/credentials" (repeat).'),
    ] = None,
    end_users: Annotated[
        int, typer.Option(help="End users with one passkey each to create on first start.")
    ] = 0,
    authenticator_state: Annotated[
        Path | None,
        typer.Option(
            help="File (outside --state-dir) for the end users' authenticator, private keys"
            " included; needed with --end-users."
        ),
    ] = None,
    webauthn_origin: Annotated[
        list[str] | None,
        typer.Option(help="Allowed WebAuthn origin, e.g. https://app.example.com (repeat)."),
    ] = None,
    webauthn_rp_id: Annotated[
        list[str] | None,
        typer.Option(help="Allowed WebAuthn rpId, e.g. example.com (repeat; first is default)."),
    ] = None,
    user_verification: Annotated[
        str | None,
        typer.Option(help='"required" or "preferred" user verification for passkeys.'),
    ] = None,
) -> None:
    """Serve the sandbox in the foreground; SIGTERM or Ctrl-C stops it."""
    from keyturn.sandbox.app import SandboxSettings
    from keyturn.sandbox.server import serve as run

    try:
        faults = FaultConfig(
            latency_ms=latency_ms,
            error_rate=error_rate,
            rate_429=rate_429,
            hang_rate=hang_rate,
            hang_seconds=hang_seconds,
            rate_limit_per_minute=rate_limit_per_minute,
            apply_then_fail_rate=apply_then_fail_rate,
            apply_then_fail_mode=apply_then_fail_mode,
            paths=[" ".join(p.split()) for p in fault_path or []],
        )
    except FaultConfigError as exc:
        typer.echo(f"keyturn: error: {exc}", err=True)
        raise typer.Exit(2) from None
    if time_scale <= 0:
        typer.echo("keyturn: error: --time-scale must be greater than 0", err=True)
        raise typer.Exit(2)
    if service_accounts < 1:
        typer.echo("keyturn: error: --service-accounts must be at least 1", err=True)
        raise typer.Exit(2)
    if event_rate < 0:
        typer.echo("keyturn: error: --event-rate must be zero or positive", err=True)
        raise typer.Exit(2)
    problem = _cannot_listen(host, port)
    if problem is not None:  # before anything is created
        typer.echo(f"keyturn: error: {problem}", err=True)
        raise typer.Exit(2)
    settings = SandboxSettings(
        state_dir=state_dir,
        service_accounts=service_accounts,
        event_rate=event_rate,
        time_scale=time_scale,
        faults=faults,
        end_users=end_users,
        authenticator_state=authenticator_state,
        webauthn_origins=list(webauthn_origin or []),
        webauthn_rp_ids=list(webauthn_rp_id or []),
        user_verification=user_verification,
    )
    try:
        run(settings, host=host, port=port)
    except KeyboardInterrupt:
        pass
    except ValueError as exc:
        typer.echo(f"keyturn: error: {exc}", err=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        typer.echo(
            f"keyturn: error: cannot use state dir {state_dir}: {exc.strerror or exc}", err=True
        )
        raise typer.Exit(1) from None
    except sqlite3.Error as exc:
        typer.echo(
            f"keyturn: error: the state database in {state_dir} is unusable ({exc});"
            " move the directory away to start fresh",
            err=True,
        )
        raise typer.Exit(1) from None

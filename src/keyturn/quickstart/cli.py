"""The quickstart's commands, mounted on the `keyturn` app: `init` and `demo`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from rich.console import Console


def mount(app: typer.Typer, out: Console) -> None:
    @app.command()
    def init(
        workdir: Annotated[
            Path, typer.Argument(help="Directory for the config, key and database.")
        ],
        sandbox_bootstrap: Annotated[
            Path | None,
            typer.Option("--sandbox-bootstrap", help="The sandbox's bootstrap.json."),
        ] = None,
        enable_webhook: Annotated[
            bool,
            typer.Option(
                "--enable-webhook",
                help="In a directory set up already: enable sandbox-webhook once the receiver "
                "holds its secret.",
            ),
        ] = False,
        receiver_url: Annotated[
            str,
            typer.Option(
                "--receiver-url",
                help="Base URL of the webhook receiver (keyturn receiver serve).",
            ),
        ] = "http://127.0.0.1:8091",
    ) -> None:
        """Set up a working directory wired to a sandbox's service account, PAT and webhook.

        They are managed as sandbox-service-account, sandbox-pat and sandbox-webhook; the
        webhook points at a receiver."""
        from keyturn.domain.errors import KeyturnError
        from keyturn.quickstart.init import enable_webhook_when_loaded, init_workdir

        if enable_webhook:
            why = enable_webhook_when_loaded(workdir / "keyturn.toml")
            if why is not None:
                raise KeyturnError(why)
            out.print("sandbox-webhook enabled: the receiver holds its secret")
            return
        if sandbox_bootstrap is None:
            raise KeyturnError("init needs --sandbox-bootstrap FILE (the sandbox's bootstrap.json)")
        config_path = init_workdir(workdir, sandbox_bootstrap, receiver_url)
        out.print(f"initialised {workdir}; use `keyturn --config {config_path} ...`")
        why = enable_webhook_when_loaded(config_path)
        if why is not None:
            out.print(why, markup=False)

    @app.command()
    def demo() -> None:
        """Rotate all three kinds against a local sandbox, end to end, and check the result."""
        from keyturn.cli.render import real_console
        from keyturn.quickstart.demo import run_demo

        if not run_demo(real_console(out)):
            raise typer.Exit(1)

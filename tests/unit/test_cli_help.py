"""Every command and every option of the `keyturn` command line says what it is for."""

from __future__ import annotations

from collections.abc import Iterator

import click
import typer

from keyturn.cli import app


def _commands(group: click.Command, path: str = "keyturn") -> Iterator[tuple[str, click.Command]]:
    yield path, group
    if isinstance(group, click.Group):
        for name, sub in group.commands.items():
            yield from _commands(sub, f"{path} {name}")


def test_every_command_and_option_has_help() -> None:
    missing = []
    for path, command in _commands(typer.main.get_command(app)):
        if not (command.help or command.short_help):
            missing.append(path)
        for param in command.params:
            if isinstance(param, click.Option) and not param.help and param.name != "help":
                missing.append(f"{path} {param.opts[0]}")
    assert missing == []

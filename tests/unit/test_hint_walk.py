"""The hint walk: a rotation halted in every state it can halt in gets advice naming commands;
each command printed is run through the real CLI and must be accepted (a rollback shows its
plan and, off a terminal, asks for --yes), never refused for a reason the hint hides."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from keyturn import logs
from keyturn.adapters.keys import CryptoKeys
from keyturn.adapters.store.migrate import open_store, upgrade
from keyturn.adapters.vault import AesGcmVault, MasterKey
from keyturn.cli import app
from keyturn.cli import state as cli_state
from keyturn.cli.wiring import SystemClock
from keyturn.domain.lifecycle import State
from keyturn.domain.model import ManagedCredential
from keyturn.engine.operator import halt_advice, start_rotation
from keyturn.engine.registry import discovered
from keyturn.ports import Change

HALTABLE = [State.PENDING, State.NEW_ADDED, State.VERIFIED, State.ROLLING_BACK]


@pytest.fixture(autouse=True)
def _logs_back_on_stderr() -> Iterator[None]:
    """The CLI binds the logs to the runner's stream, closed after each invoke: put them back
    on the process's stderr for the tests that run after these in this process."""
    yield
    logs.configure("console", "warning")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("KEYTURN_CONFIG", "KEYTURN_DATABASE_URL", "KEYTURN_MASTER_KEY"):
        monkeypatch.delenv(var, raising=False)
    key = MasterKey.generate()
    (tmp_path / "master.key").write_text(key.text() + "\n")
    (tmp_path / "master.key").chmod(0o600)
    (tmp_path / "token").write_text("tok\n")
    credentials = "".join(
        f'[credentials.svc-{s.value}]\nkind = "service_account"\nprovider = "p"\n'
        f'token_file = "token"\n[[credentials.svc-{s.value}.targets]]\ntype = "file"\n'
        f'path = "deploy/{s.value}"\n'
        for s in HALTABLE
    )
    (tmp_path / "keyturn.toml").write_text(
        f'[database]\nurl = "sqlite:///{tmp_path / "k.db"}"\n[keys]\nmaster_key_file = '
        f'"master.key"\n[providers.p]\nbase_url = "http://127.0.0.1:9"\n{credentials}'
    )
    upgrade(f"sqlite:///{tmp_path / 'k.db'}")
    store = open_store(f"sqlite:///{tmp_path / 'k.db'}")
    vault = AesGcmVault(key)
    pem = CryptoKeys().generate("ed25519").private_pem
    for s in HALTABLE:
        ref = f"sec_{s.value}"
        store.add_credential(
            ManagedCredential(
                f"svc-{s.value}", "service_account", "p", "cid", f"cr-{s.value}", ref, "ed25519"
            ),
            [vault.seal(ref, "private_key", pem)],
        )
    store.close()
    return tmp_path


def _commands(advice: str) -> list[list[str]]:
    return [c.split()[1:] for c in re.findall(r"`(keyturn [^`]*)`", advice)]


@pytest.mark.parametrize("state", HALTABLE, ids=lambda s: s.value)
def test_every_hint_of_a_halted_rotation_is_accepted(workdir: Path, state: State) -> None:
    url = f"sqlite:///{workdir / 'k.db'}"
    store = open_store(url)
    registry = discovered()
    rotation = start_rotation(
        store, registry, SystemClock(), credential=f"svc-{state.value}", reason="walk",
        actor="t", options={"algorithm": "ed25519", "via": "credentials"},
    )  # fmt: skip
    halted = store.commit(
        Change(rotation.id, rotation.version, {"state": state, "halted_reason": "step x: boom"})
    )
    advice = halt_advice(store, registry, halted)
    store.close()
    commands = _commands(advice)
    assert commands, advice
    assert any(c[:2] == ["rotations", "resume"] for c in commands)
    if state is State.ROLLING_BACK:
        assert not any(c[:2] == ["rotations", "rollback"] for c in commands), advice
    for command in commands:
        argv = [a if a != "..." else "walk" for a in command]
        assert argv[2] == rotation.id
        cli_state._config = None  # one process per command in real life
        result = CliRunner().invoke(app, ["--config", str(workdir / "keyturn.toml"), *argv])
        if argv[1] == "rollback":
            # it validated and planned; off a terminal it shows the plan and asks for --yes
            assert "would, in order:" in result.output, result.output
            assert "not confirmed" in str(result.exception), result.exception
        else:
            assert result.exit_code == 0, (command, result.output)
            assert "applied" in result.output

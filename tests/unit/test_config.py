"""Configuration: defaults, relative paths, overrides, and one-line errors naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyturn.config import load_config
from keyturn.domain.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "name", ["keyturn.example.toml", "production.example.toml", "targets.example.toml"]
)
def test_shipped_examples_are_valid(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYTURN_DATABASE_URL", raising=False)
    config = load_config(ROOT / "config" / name)
    assert config.credentials


def test_relative_paths_follow_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYTURN_DATABASE_URL", raising=False)
    (tmp_path / "sub").mkdir()
    cfg = tmp_path / "sub" / "k.toml"
    cfg.write_text(
        '[database]\nurl = "sqlite:///keyturn.db"\n'
        '[keys]\nmaster_key_file = "mk"\n[providers.p]\nbase_url = "http://h:1/"\n'
        '[credentials.c]\nkind = "service_account"\nprovider = "p"\n'
        '[[credentials.c.targets]]\npath = "deploy"\n'
    )
    monkeypatch.chdir(tmp_path)
    config = load_config(cfg)
    assert config.database.url == f"sqlite:///{(tmp_path / 'sub' / 'keyturn.db').resolve()}"
    assert config.keys.master_key_file == tmp_path / "sub" / "mk"
    assert config.credentials["c"].targets[0].path == tmp_path / "sub" / "deploy"
    assert config.providers["p"].base_url == "http://h:1"
    # With no [database] section the default database is in the working directory.
    cfg.write_text("")
    assert load_config(cfg).database.url == "sqlite:///keyturn.db"


def test_database_url_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYTURN_DATABASE_URL", "postgresql+psycopg://u@h/db")
    cfg = tmp_path / "k.toml"
    cfg.write_text("")
    assert load_config(cfg).database.url == "postgresql+psycopg://u@h/db"


@pytest.mark.parametrize(
    "text, needles",
    [
        ("[worker]\nconcurrency = 0\n", ["worker.concurrency", "greater than or equal to 1"]),
        ('[credentials.c]\nkind = "dragon"\nprovider = "p"\n', ["credentials.c.kind"]),
        ('[credentials.c]\nkind = "pat"\nprovider = "nowhere"\n', ["no provider named", "nowhere"]),
        ("a = [", ["not valid TOML"]),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, needles: list[str]) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    message = str(info.value)
    assert str(cfg) in message and "\n" not in message
    for needle in needles:
        assert needle in message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    "extra, needles",
    [
        (
            '[credentials.w]\nkind = "webhook"\nprovider = "p"\n',
            ["credentials.w.signer", "service_account or pat"],
        ),
        (
            '[credentials.k]\nkind = "pat"\nprovider = "p"\n'
            'registration = "service_account_endpoint"\n',
            ["credentials.k.registration", "PAT"],
        ),
        (
            '[credentials.s]\nkind = "service_account"\nprovider = "p"\n'
            '[[credentials.s.targets]]\ntype = "secrets_file"\npath = "x"\n',
            ["credentials.s.targets[0].type", '"file"'],
        ),
    ],
)
def test_kind_specific_rules(tmp_path: Path, extra: str, needles: list[str]) -> None:
    cfg = tmp_path / "k.toml"
    cfg.write_text('[providers.p]\nbase_url = "http://h:1"\n' + extra)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    for needle in needles:
        assert needle in str(info.value)

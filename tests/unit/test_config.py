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


# ------------------------------------------------------------------- config honesty (issue 12)

PROVIDER = '[providers.p]\nbase_url = "http://h:1"\n'


def test_grace_seconds_on_a_service_account_is_refused(tmp_path: Path) -> None:
    """The kind's model refuses keys it does not take (extra="forbid"); the error says the key
    belongs to another kind and to remove it, with the file and the key."""
    cfg = tmp_path / "k.toml"
    cfg.write_text(
        PROVIDER + '[credentials.s]\nkind = "service_account"\nprovider = "p"\n'
        "grace_seconds = 600\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert str(info.value) == (
        f"config file {cfg}: key credentials.s.grace_seconds: does not apply to a "
        "service_account credential (it is a key of webhook credentials only); remove it"
    )


def test_a_key_of_another_target_type_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "k.toml"
    cfg.write_text(
        PROVIDER + '[credentials.s]\nkind = "service_account"\nprovider = "p"\n'
        '[[credentials.s.targets]]\ntype = "file"\npath = "d"\nmount = "secret"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    message = str(info.value)
    assert "key credentials.s.targets[0].mount: does not apply to a file target" in message
    assert "vault_kv targets" in message


@pytest.mark.parametrize(
    "text, key, hint",
    [
        ("[worker]\nlease_secs = 3\n", "worker.lease_secs", "did you mean lease_seconds?"),
        ("[keys]\nmaster_key = 'x'\n", "keys.master_key", "did you mean master_key_file?"),
        (PROVIDER + "timeout = 3\n", "providers.p.timeout", "did you mean timeout_seconds?"),
        ("[database]\npool = 3\n", "database.pool", ""),
        ("[logging]\ncolour = true\n", "logging.colour", ""),
        ("[workers]\nconcurrency = 3\n", "workers", "did you mean worker?"),
    ],
)
def test_unknown_keys_are_refused_in_every_section(
    tmp_path: Path, text: str, key: str, hint: str
) -> None:
    cfg = tmp_path / "k.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    message = str(info.value)
    assert message.startswith(f"config file {cfg}: key {key}: unknown key; {hint}")
    assert "config/keyturn.example.toml" in message


def test_no_config_anywhere_is_an_error_not_a_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KEYTURN_CONFIG", raising=False)
    monkeypatch.setenv("KEYTURN_DATABASE_URL", f"sqlite:///{tmp_path / 'k.db'}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(None)
    assert str(info.value) == (
        "no configuration found: no --config given, KEYTURN_CONFIG is not set and there is no "
        f"keyturn.toml in {tmp_path}; pass --config FILE, set KEYTURN_CONFIG=FILE, or create "
        "one with `keyturn init DIR`"
    )
    assert list(tmp_path.iterdir()) == []
    # ./keyturn.toml is found
    (tmp_path / "keyturn.toml").write_text(PROVIDER)
    assert load_config(None).source == Path("keyturn.toml")


def test_keyturn_config_is_named_as_the_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nope.toml"
    monkeypatch.setenv("KEYTURN_CONFIG", str(missing))
    with pytest.raises(ConfigError, match=r"\(from environment variable KEYTURN_CONFIG\)"):
        load_config(None)
    missing.write_text(PROVIDER)
    assert load_config(None).source == missing


@pytest.mark.parametrize(
    "url, words",
    [
        ("mysql://h/db", "expected a sqlite:///PATH or postgresql+psycopg://... URL"),
        ("postgresql+psycopg://h:port/db", "its port is not a number"),
    ],
)
def test_a_bad_database_url_from_the_environment_names_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, words: str
) -> None:
    cfg = tmp_path / "k.toml"
    cfg.write_text('[database]\nurl = "sqlite:///fine.db"\n')
    monkeypatch.setenv("KEYTURN_DATABASE_URL", url)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert str(info.value) == (
        f"environment variable KEYTURN_DATABASE_URL: {words}; fix or unset it (it overrides "
        f"database.url of {cfg})"
    )
    # the same value in the file is the file's problem
    monkeypatch.delenv("KEYTURN_DATABASE_URL")
    cfg.write_text(f'[database]\nurl = "{url}"\n')
    with pytest.raises(ConfigError, match=f"config file {cfg}: key database.url: "):
        load_config(cfg)


def test_where_the_database_url_came_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYTURN_DATABASE_URL", raising=False)
    cfg = tmp_path / "k.toml"
    cfg.write_text('[database]\nurl = "sqlite:///k.db"\n')
    assert load_config(cfg).database_url_from == f"database.url in {cfg}"
    monkeypatch.setenv("KEYTURN_DATABASE_URL", "sqlite:///other.db")
    assert load_config(cfg).database_url_from == "environment variable KEYTURN_DATABASE_URL"


def test_database_errors_name_the_source(tmp_path: Path) -> None:
    from keyturn.adapters.store.migrate import ensure_migrated

    garbage = tmp_path / "notes.db"
    garbage.write_text("not a database\n" * 200)
    source = "environment variable KEYTURN_DATABASE_URL"
    with pytest.raises(ConfigError, match=f"check {source}$"):
        ensure_migrated(f"sqlite:///{garbage}", source=source)
    with pytest.raises(ConfigError, match=f"{source} is not a valid database URL") as info:
        ensure_migrated("postgresql+psycopg://u:secret@h:port/db", source=source)
    assert "secret" not in str(info.value)


def test_the_head_revision_is_read_without_alembic_as_alembic_reads_it() -> None:
    from alembic.script import ScriptDirectory

    from keyturn.adapters.store.migrate import alembic_config, head_revision, linear_head

    alembic_head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert linear_head() == alembic_head == head_revision()

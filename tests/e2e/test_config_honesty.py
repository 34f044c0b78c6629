"""Config honesty (issue 12), through the real command line: with no config, a config keyturn
cannot use, or a bad value in KEYTURN_DATABASE_URL / KEYTURN_MASTER_KEY / KEYTURN_CONFIG, every
command prints exactly one line starting ``keyturn: error:`` that names the true source of the
problem (the file and key, or the environment variable) and the fix, exits non-zero without a
traceback, and creates or changes no database (nor any other file)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
from harness import KEYTURN

from keyturn.adapters.store.migrate import upgrade
from keyturn.adapters.store.sql import SqlStore
from keyturn.adapters.vault import AesGcmVault, MasterKey, new_master_key
from keyturn.domain.model import ManagedCredential

NAME = "svc"
CONFIG = f"""\
[database]
url = "sqlite:///keyturn.db"

[keys]
master_key_file = "master.key"

[providers.p]
base_url = "http://127.0.0.1:9"

[credentials.{NAME}]
kind = "service_account"
provider = "p"
token_env = "SVC_TOKEN"

[[credentials.{NAME}.targets]]
type = "file"
path = "deploy"
"""

#: Every command that needs a config (and so a database), with arguments it would accept.
NEEDS_CONFIG = [
    ["rotations", "list"],
    ["rotations", "show", "rot_nope"],
    ["rotations", "resume", "rot_nope", "--reason", "x"],
    ["rotate", NAME],
    ["credentials", "list"],
    ["reconcile"],
    ["worker", "--until-idle"],
    ["db", "upgrade"],
    ["keys", "rotate-master", "--new-key-file", "new.key"],
]

#: Commands that run without any config (and must create nothing).
NO_CONFIG_NEEDED = [
    ["--help"],
    ["--version"],
    ["plugins"],
    ["keys", "new-master"],
    ["init", "--help"],
    ["demo", "--help"],
    ["sandbox", "--help"],
    ["receiver", "--help"],
    ["rotations", "list", "--help"],
]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYTURN_")}
    env.update(extra)
    return env


def _run(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KEYTURN, *args],
        cwd=cwd,
        env=env if env is not None else _env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _snapshot(root: Path) -> dict[str, object]:
    """Every file under `root`: a database as a dump of its content (read with its WAL, which
    a command that opened it may leave behind without writing anything), any other file as its
    bytes. A database created or changed shows up."""
    snap: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name.endswith(("-wal", "-shm")):
            continue
        if p.suffix == ".db":
            with sqlite3.connect(f"{p.as_uri()}?mode=ro", uri=True) as conn:
                snap[p.name] = "\n".join(conn.iterdump())
            conn.close()
        else:
            snap[str(p.relative_to(root))] = p.read_bytes()
    return snap


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, f"expected one line, got:\n{err}"
    assert err.startswith("keyturn: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A keyturn directory: the config, a master key, a migrated SQLite database holding one
    managed service account whose key is sealed under that master key."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "keyturn.toml").write_text(CONFIG)
    master = MasterKey.generate()
    key = work / "master.key"
    key.write_text(master.text() + "\n")
    key.chmod(0o600)
    url = f"sqlite:///{work / 'keyturn.db'}"
    upgrade(url)
    store = SqlStore(url)
    try:
        sealed = AesGcmVault(master).seal("sec_svc", "private_key", b"not really a key")
        store.add_credential(
            ManagedCredential(NAME, "service_account", "p", "cid", "cr-1", "sec_svc", "ed25519"),
            [sealed],
        )
    finally:
        store.close()
    return work


def unchanged(root: Path, proc_of: object, *needles: str) -> str:
    before = _snapshot(root)
    assert callable(proc_of)
    err = assert_one_line_error(proc_of(), *needles)
    assert _snapshot(root) == before, "a bad-input command changed or created a file"
    return err


# ---------------------------------------------------------------------------------- no config


@pytest.mark.parametrize("args", NEEDS_CONFIG, ids=" ".join)
def test_no_config_says_where_it_looked_and_creates_nothing(
    tmp_path: Path, args: list[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    err = assert_one_line_error(
        _run(empty, *args),
        "no configuration found",
        "--config FILE",
        "KEYTURN_CONFIG",
        "keyturn init DIR",
        f"keyturn.toml in {empty}",
    )
    assert "db upgrade" not in err
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("args", NO_CONFIG_NEEDED, ids=" ".join)
def test_commands_that_need_no_config_run_without_one(tmp_path: Path, args: list[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _run(empty, *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert list(empty.iterdir()) == []


def test_version_is_the_installed_distributions(tmp_path: Path) -> None:
    from importlib.metadata import version

    assert _run(tmp_path, "--version").stdout == f"keyturn {version('keyturn')}\n"


# --------------------------------------------------------------------------- bad config file


def test_a_key_of_another_kind_is_refused_with_file_key_and_fix(workdir: Path) -> None:
    config = workdir / "keyturn.toml"
    config.write_text(
        CONFIG.replace('token_env = "SVC_TOKEN"', 'token_env = "SVC_TOKEN"\ngrace_seconds = 600')
    )
    for args in (["rotate", NAME], ["rotations", "list"], ["worker", "--until-idle"]):
        unchanged(
            workdir,
            lambda a=args: _run(workdir, *a),
            f"config file {config.name}",
            f"credentials.{NAME}.grace_seconds",
            "does not apply to a service_account credential",
            "webhook",
            "remove it",
        )


@pytest.mark.parametrize(
    "section, key, needles",
    [
        ("[worker]", "lease_secs = 3", ("worker.lease_secs", "unknown key", "lease_seconds")),
        ("[keys]", "retention = 3", ("keys.retention", "unknown key", "retention_days")),
        ("[providers.p]", "timeout = 3", ("providers.p.timeout", "timeout_seconds")),
        ("[database]", "pool = 3", ("database.pool", "unknown key")),
        ("[logging]", "colour = true", ("logging.colour", "unknown key")),
        (f"[[credentials.{NAME}.targets]]", "mode = 1", ("targets[0].mode", "unknown key")),
    ],
)
def test_unknown_keys_in_every_section_are_refused(
    workdir: Path, section: str, key: str, needles: tuple[str, ...]
) -> None:
    config = workdir / "keyturn.toml"
    text = CONFIG if section + "\n" in CONFIG else f"{CONFIG}\n{section}\n"
    config.write_text(text.replace(section + "\n", f"{section}\n{key}\n", 1))
    unchanged(workdir, lambda: _run(workdir, "rotations", "list"), "keyturn.toml", *needles)


def test_invalid_toml(workdir: Path) -> None:
    (workdir / "keyturn.toml").write_text("[worker\nlease_seconds = 3\n")
    unchanged(workdir, lambda: _run(workdir, "rotations", "list"), "keyturn.toml", "not valid TOML")


@pytest.mark.parametrize("how", ["directory", "not utf-8", "mode 000", "missing"])
def test_unreadable_config_file(workdir: Path, tmp_path: Path, how: str) -> None:
    bad = tmp_path / "bad.toml"
    needles: tuple[str, ...]
    if how == "directory":
        bad.mkdir()
        needles = ("is a directory",)
    elif how == "not utf-8":
        bad.write_bytes(b'[database]\nurl = "\xff\xfe"\n')
        needles = ("not UTF-8",)
    elif how == "mode 000":
        if os.geteuid() == 0:
            pytest.skip("root reads a file of mode 000")
        bad.write_text(CONFIG)
        bad.chmod(0)
        needles = ("cannot be read", "Permission denied")
    else:
        needles = ("does not exist", "--config FILE")
    unchanged(
        workdir,
        lambda: _run(workdir, "--config", str(bad), "rotations", "list"),
        str(bad),
        *needles,
    )


# ------------------------------------------------------------------------ the environment


def test_keyturn_config_pointing_nowhere_names_the_variable(workdir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    unchanged(
        workdir,
        lambda: _run(workdir, "rotations", "list", env=_env(KEYTURN_CONFIG=str(missing))),
        f"config file {missing} (from environment variable KEYTURN_CONFIG) does not exist",
    )


@pytest.mark.parametrize(
    "url, needles",
    [
        ("mysql://db/keyturn", ("expected a sqlite:///PATH or postgresql+psycopg://",)),
        ("postgresql+psycopg://db:notaport/keyturn", ("port is not a number",)),
    ],
)
def test_bad_database_url_in_the_environment_is_not_blamed_on_the_file(
    workdir: Path, url: str, needles: tuple[str, ...]
) -> None:
    env = _env(KEYTURN_DATABASE_URL=url)
    err = unchanged(
        workdir,
        lambda: _run(workdir, "rotations", "list", env=env),
        "keyturn: error: environment variable KEYTURN_DATABASE_URL: ",
        "fix or unset it",
        *needles,
    )
    assert "key database.url" not in err


def test_database_url_from_the_environment_that_cannot_be_used(workdir: Path) -> None:
    not_a_db = workdir / "notes.txt"
    not_a_db.write_text("this is not a database\n" * 100)
    cases = [
        (f"sqlite:///{not_a_db}", ("not a keyturn SQLite database",)),
        ("postgresql+psycopg://root@127.0.0.1:1/keyturn", ("cannot use database", "port 1")),
        (f"sqlite:///{workdir / 'absent' / 'k.db'}", ("not migrated", "keyturn db upgrade")),
    ]
    for i, (url, needles) in enumerate(cases):
        env = _env(KEYTURN_DATABASE_URL=url)
        args = ["worker", "--until-idle"] if i % 2 else ["rotations", "list"]
        unchanged(
            workdir,
            lambda a=args, e=env: _run(workdir, *a, env=e),
            "environment variable KEYTURN_DATABASE_URL",
            *needles,
        )


def test_bad_master_key_in_the_environment_names_the_variable(workdir: Path) -> None:
    for value, needles in (
        ("not-a-key", ("environment variable KEYTURN_MASTER_KEY does not hold",)),
        (
            new_master_key(),
            ("master key from environment variable KEYTURN_MASTER_KEY", "is not the one"),
        ),
    ):
        env = _env(KEYTURN_MASTER_KEY=value, KEYTURN_CONFIG=str(workdir / "keyturn.toml"))
        for args in (["worker", "--until-idle"], ["rotate", NAME]):
            err = unchanged(workdir, lambda a=args, e=env: _run(workdir, *a, env=e), *needles)
            assert "master.key" not in err  # the file is not what is wrong


def test_bad_master_key_file_names_the_file_and_the_setting(workdir: Path) -> None:
    (workdir / "master.key").write_text("not-a-key\n")
    unchanged(
        workdir,
        lambda: _run(workdir, "worker", "--until-idle"),
        "master key file",
        "(keys.master_key_file in ",
        "keyturn.toml",
    )

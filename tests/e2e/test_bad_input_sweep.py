"""The bad-input sweep (issue 12): every command, given bad input of every kind (files,
environment, ids, states, options, URLs), answers with one line starting ``keyturn: error:``
that names what is wrong, exits non-zero, prints no traceback, and changes nothing: the
database dump, the working directory's files and the sandbox's credentials are the same
before and after.

One installation serves the whole sweep (each case leaves it as it found it): a finished
service-account rotation and a PAT rotation still pending. The servers' own bad input (ports,
addresses, flags) is swept in tests/integration/test_server_bad_input.py, and the config file's
in test_config_honesty.py and test_bad_input.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import PAT, SA, WEBHOOK, Kt, KtFactory


@dataclass
class Installation:
    kt: Kt
    done: str  # a finished rotation of SA
    pending: str  # a pending rotation of PAT
    files: Path  # bad and good input files made for the sweep

    def fingerprint(self) -> dict[str, object]:
        """What a refused command must not change."""
        tree = {
            str(p.relative_to(self.kt.workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(self.kt.workdir.rglob("*"))
            if p.is_file() and not p.name.startswith("keyturn.db")
        }
        return {
            "db": self.kt.sqlite_dump(),
            "files": tree,
            "provider": self.kt.provider_credentials(),
        }


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    factory = KtFactory(tmp_path_factory.mktemp("sweep"))
    try:
        kt = factory.make()
        done = kt.rotate(SA)
        kt.worker("--until-idle")
        assert kt.show(done)["state"] == "old_deactivated"
        pending = kt.rotate(PAT)
        files = kt.workdir.parent / "inputs"
        files.mkdir()
        (files / "garbage.txt").write_text("this is not a key\n")
        (files / "bad.jsonl").write_text('{"name": "x", "kind": \n')
        entry = {"name": "extra", "kind": "nope", "provider": "sandbox", "credential_id": "cr-x"}
        (files / "unknown-kind.jsonl").write_text(json.dumps(entry) + "\n")
        (files / "bootstrap.json").write_text("{}\n")
        # a credential in the config that is not yet managed, for the import cases
        with kt.config.open("a") as f:
            f.write(EXTRA)
        yield Installation(kt, done, pending, files)
    finally:
        factory.close()


EXTRA = """
[credentials.extra]
kind = "service_account"
provider = "sandbox"

[[credentials.extra.targets]]
type = "file"
name = "local-files"
path = "deploy/extra"
"""

IMPORT = ["credentials", "import", "extra", "--kind", "service_account", "--provider", "sandbox",
          "--credential-id", "cr-x", "--credential-uuid", "cr-x"]  # fmt: skip


def _run(
    inst: Installation, args: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return inst.kt.run(*args, check=False, env=inst.kt.env(**env) if env else None, timeout=60)


#: (case id, args, extra environment, words the one line must contain). In args, {done},
#: {pending}, {files} and {work} are replaced by the installation's.
CASES: list[tuple[str, list[str], dict[str, str], tuple[str, ...]]] = [
    # --- global options and the environment
    ("log-format", ["--log-format", "xml", "rotations", "list"], {}, ("--log-format", "xml")),
    ("config-missing", ["-c", "{files}/none.toml", "rotations", "list"], {}, ("none.toml",)),
    ("env-config-missing", ["rotations", "list"], {"KEYTURN_CONFIG": "/nowhere/k.toml"},
     ("KEYTURN_CONFIG",)),
    ("env-db-url", ["rotations", "list"], {"KEYTURN_DATABASE_URL": "mysql://x/y"},
     ("KEYTURN_DATABASE_URL",)),
    ("env-master-key", ["rotate", WEBHOOK], {"KEYTURN_MASTER_KEY": "not-a-key"},
     ("KEYTURN_MASTER_KEY",)),
    ("unknown-command", ["rotatons", "list"], {}, ("rotatons",)),
    ("unknown-option", ["rotations", "list", "--colour"], {}, ("--colour",)),
    # --- rotate
    ("rotate-nothing", ["rotate"], {}, ("--all",)),
    ("rotate-unknown", ["rotate", "nope"], {}, ("nope", "credentials list")),
    ("rotate-unknown-kind", ["rotate", "--kind", "nope"], {}, ("nope",)),
    ("rotate-names-and-all", ["rotate", SA, "--all"], {}, ("--all",)),
    ("rotate-rotating", ["rotate", PAT], {}, ("unfinished rotation", "{pending}")),
    # --- worker
    ("worker-concurrency-0", ["worker", "--concurrency", "0"], {}, ("--concurrency",)),
    ("worker-concurrency-text", ["worker", "--concurrency", "many"], {}, ("--concurrency",)),
    # --- rotations list
    ("list-state", ["rotations", "list", "--state", "stuck"], {}, ("--state", "stuck")),
    ("list-status", ["rotations", "list", "--status", "sad"], {}, ("--status", "sad")),
    ("list-credential", ["rotations", "list", "--credential", "nope"], {}, ("nope",)),
    ("list-kind", ["rotations", "list", "--kind", "nope"], {}, ("nope",)),
    ("list-since", ["rotations", "list", "--since", "yesterday"], {}, ("--since", "yesterday")),
    ("list-limit", ["rotations", "list", "--limit", "0"], {}, ("--limit",)),
    # --- ids
    ("show-unknown", ["rotations", "show", "rot_nope"], {}, ("rot_nope",)),
    ("show-ambiguous", ["rotations", "show", "rot_"], {}, ("rot_", "prefix")),
    ("resume-unknown", ["rotations", "resume", "rot_nope", "--reason", "x"], {}, ("rot_nope",)),
    ("resume-no-id", ["rotations", "resume", "--reason", "x"], {}, ("--latest",)),
    ("resume-latest-unknown", ["rotations", "resume", "--latest", "nope", "--reason", "x"], {},
     ("nope",)),
    ("resume-id-and-latest",
     ["rotations", "resume", "{pending}", "--latest", PAT, "--reason", "x"], {}, ("--latest",)),
    ("pause-credential-name", ["rotations", "pause", PAT, "--reason", "x"], {},
     ("is a credential", f"--latest {PAT}")),
    # --- states
    ("resume-finished", ["rotations", "resume", "{done}", "--reason", "x"], {},
     ("resume", "old_deactivated")),
    ("pause-finished", ["rotations", "pause", "{done}", "--reason", "x"], {},
     ("pause", "old_deactivated")),
    ("cancel-finished", ["rotations", "cancel", "{done}", "--reason", "x"], {},
     ("cancel", "old_deactivated")),
    # --- credentials import
    ("import-no-kind", ["credentials", "import", "x", "--provider", "sandbox"], {}, ("--kind",)),
    ("import-unknown-kind", [*IMPORT[:3], "--kind", "nope", *IMPORT[5:]], {}, ("nope",)),
    ("import-not-in-config", ["credentials", "import", "x", *IMPORT[3:]], {},
     ("[credentials.x]",)),
    ("import-key-file-missing", [*IMPORT, "--private-key-file", "{files}/none.pem"], {},
     ("none.pem",)),
    ("import-key-file-garbage", [*IMPORT, "--private-key-file", "{files}/garbage.txt"], {},
     ("garbage.txt",)),
    ("import-managed", [*IMPORT[:2], SA, *IMPORT[3:]], {}, (SA,)),
    ("import-file-missing", ["credentials", "import", "--file", "{files}/none.jsonl"], {},
     ("none.jsonl",)),
    ("import-file-malformed", ["credentials", "import", "--file", "{files}/bad.jsonl"], {},
     ("bad.jsonl",)),
    ("import-file-unknown-kind", ["credentials", "import", "--file",
                                  "{files}/unknown-kind.jsonl"], {}, ("nope",)),
    # --- keys
    ("rotate-master-missing", ["keys", "rotate-master", "--new-key-file", "{files}/none.key"],
     {}, ("none.key",)),
    ("rotate-master-garbage", ["keys", "rotate-master", "--new-key-file",
                               "{files}/garbage.txt"], {}, ("garbage.txt",)),
    # --- init (the installation's own directory, and new ones that must not appear)
    ("init-existing", ["init", "{work}", "--sandbox-bootstrap", "{bootstrap}"], {}, ("{work}",)),
    ("init-bootstrap-missing", ["init", "{files}/new-1", "--sandbox-bootstrap",
                                "{files}/none.json"], {}, ("none.json",)),
    ("init-bootstrap-empty", ["init", "{files}/new-2", "--sandbox-bootstrap",
                              "{files}/bootstrap.json"], {}, ("bootstrap.json",)),
    ("init-receiver-url", ["init", "{files}/new-3", "--sandbox-bootstrap", "{bootstrap}",
                           "--receiver-url", "receiver:9"], {}, ("--receiver-url",)),
    # --- passkey campaigns (issue 17; the passkey entry's own cases: test_passkey_campaign.py)
    ("passkeys-not-an-entry", ["passkeys", "campaign", SA, "--users", "{files}/garbage.txt",
                               "--reason", "x"], {}, ("not a passkey entry",)),
    ("passkeys-unknown-entry", ["passkeys", "campaign", "nope", "--all", "--reason", "x"], {},
     ("[credentials.nope]",)),
    ("passkeys-blank-reason", ["passkeys", "campaign", SA, "--all", "--reason", " "], {},
     ("--reason",)),
    ("passkeys-progress-unknown", ["passkeys", "progress", "nope"], {}, ("no campaign", "nope")),
    ("passkeys-cutover-unknown", ["passkeys", "cutover", "nope", "--reason", "x"], {},
     ("no campaign", "nope")),
    # --- retry-now, tokens and serve (issue 14)
    ("retry-now-pending", ["rotations", "retry-now", "{pending}", "--reason", "x"], {},
     ("cannot retry-now", "no attempt has failed")),
    ("retry-now-done", ["rotations", "retry-now", "{done}", "--reason", "x"], {},
     ("finished",)),
    ("retry-now-blank-reason", ["rotations", "retry-now", "{pending}", "--reason", " "], {},
     ("--reason",)),
    ("release-lease-unleased", ["rotations", "release-lease", "{pending}", "--reason", "x"], {},
     ("cannot release-lease", "no worker holds its lease")),
    ("release-lease-done", ["rotations", "release-lease", "{done}", "--reason", "x"], {},
     ("finished",)),
    ("release-lease-blank-reason", ["rotations", "release-lease", "{pending}", "--reason", ""],
     {}, ("--reason",)),
    ("tokens-role", ["tokens", "create", "--role", "root", "--name", "x"], {}, ("--role", "root")),
    ("tokens-name", ["tokens", "create", "--role", "viewer", "--name", "a b"], {}, ("--name",)),
    ("tokens-revoke-unknown", ["tokens", "revoke", "nobody"], {}, ("nobody", "tokens list")),
    ("serve-port", ["serve", "--port", "99999"], {}, ("--port 99999",)),
    ("serve-host", ["serve", "--host", "203.0.113.7", "--port", "0"], {},
     ("cannot listen on 203.0.113.7:0",)),
    # --- notifications (issue 14)
    ("notifications-status", ["notifications", "list", "--status", "sending"], {},
     ("--status 'sending'", "failed")),
    ("notifications-rotation", ["notifications", "list", "--rotation", "rot_nope"], {},
     ("rot_nope",)),
    ("notifications-no-sinks", ["notifications", "deliver"], {},
     ("no notification sinks", "[notifications.sinks.NAME]")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env", "needles"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_line_and_changes_nothing(
    inst: Installation, args: list[str], env: dict[str, str], needles: tuple[str, ...]
) -> None:
    values = {
        "done": inst.done,
        "pending": inst.pending,
        "files": str(inst.files),
        "work": str(inst.kt.workdir),
        "bootstrap": str(inst.kt.sandbox.bootstrap_path),
    }
    args = [a.format(**values) for a in args]
    needles = tuple(n.format(**values) for n in needles)
    new_dirs = [Path(a) for a in args if a.startswith(str(inst.files / "new-"))]
    before = inst.fingerprint()
    proc = _run(inst, args, env)
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, f"expected one line, got:\n{err}"
    assert err.startswith("keyturn: error: "), err
    for needle in needles:
        assert needle in err, err
    assert inst.fingerprint() == before
    assert not any(d.exists() for d in new_dirs), "a refused init left a directory behind"

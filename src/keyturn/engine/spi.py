"""What a plugin declares and what the engine gives it: the seam between the engine and the
credential kinds, deploy targets and probes. Plugins import these names through
:mod:`keyturn.plugin`, never from here.

A kind declares its steps as data: each step is an ordered list of :class:`Action` (one external
effect each, run with intent before effect) and :class:`Wait` (a condition checked without
holding a lease), then a :attr:`Step.finish` that says what the managed credential points at
afterwards. The engine runs that list, generates crash kill points from it and plans with it,
so what a rotation would do and what it does come from one declaration.
"""

from __future__ import annotations

import builtins
import dataclasses
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from keyturn.domain.lifecycle import Trigger
from keyturn.domain.model import ActionRecord, ManagedCredential, Phase, Rotation, SealedSecret
from keyturn.domain.reminders import Reminders
from keyturn.ports import Fence, RequestBudget, RequestObserver, SigningKey

Detail = dict[str, Any]
T = TypeVar("T")
S = TypeVar("S")
C = TypeVar("C")
D = TypeVar("D", bound="RotationData")


# ------------------------------------------------------------------------------ configuration


class PluginModel(BaseModel):
    """Base of every plugin's configuration and data model: unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TargetConfig(PluginModel):
    """A deploy target's table (``[[credentials.NAME.targets]]``); a target type extends it."""

    type: str
    name: str | None = None


class ProbeConfig(PluginModel):
    """A probe's table (``[[credentials.NAME.probes]]``); a probe type extends it."""

    type: str
    name: str | None = None


#: Between a ``[credentials.NAME]`` entry that stands for many members and a member's name:
#: the managed credential ``NAME:MEMBER`` follows the entry's configuration.
MEMBER_SEP = ":"


class CredentialConfig(PluginModel):
    """The keys every ``[credentials.NAME]`` table has; a kind's model extends it."""

    #: The entry stands for many managed credentials, ``NAME:MEMBER`` (one per person, say),
    #: added at run time rather than configured one by one.
    has_members: ClassVar[bool] = False

    kind: str
    provider: str
    #: The bearer token: from this environment variable, or this file; otherwise the one stored
    #: encrypted when the credential was imported.
    token_env: str | None = None
    token_file: Path | None = None
    targets: list[TargetConfig] = Field(default_factory=list)
    probes: list[ProbeConfig] = Field(default_factory=list)
    #: The rotation policy (``[policies.NAME]``) this credential follows; None: the
    #: installation's ``[policies.default]`` if there is one, else rotated by hand only.
    policy: str | None = None
    #: Keys of the policy overridden for this credential (validated with the policies).
    schedule: dict[str, Any] = Field(default_factory=dict)


class RotationData(BaseModel):
    """A kind's typed rotation data (no secrets: ids, fingerprints, secret references). The
    engine stores it as JSON and gives each step the parsed model. Keys it does not declare
    are kept (data written by another version of the kind is not lost)."""

    model_config = ConfigDict(extra="allow", frozen=True)


# ------------------------------------------------------------------------------------ facts


class Facts(Protocol):
    """What a step's conditions and its plan see: the data and the action records."""

    @property
    def data(self) -> Any: ...

    def recorded(self, phase: Phase, name: str) -> bool:
        """An intent (at least) of this action is recorded."""

    def done(self, phase: Phase, name: str) -> bool:
        """This action's outcome is recorded as done."""

    @property
    def targets(self) -> Sequence[str]:
        """The names of the credential's deploy targets."""

    @property
    def probes(self) -> Sequence[str]: ...

    @property
    def target(self) -> str | None:
        """The target of an action declared ``each_target`` (None otherwise)."""


def always(_facts: Facts) -> bool:
    return True


# ------------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class Call:
    """One external call or write a step would make.

    ``what`` is "provider" (``method`` and ``path``, the provider's route template; ``signed``
    when it is a user action, preceded by the signing handshake), "target" or "probe" (``name``
    and ``op``), or "wait" (``note`` says for what). ``repeat``: polled until a condition holds.
    ``note``: what the call changes, in words (what becomes active)."""

    what: str
    method: str = ""
    path: str = ""
    signed: bool = False
    name: str = ""
    op: str = ""
    repeat: bool = False
    note: str = ""

    @staticmethod
    def provider(method: str, path: str, *, signed: bool = False, note: str = "") -> Call:
        return Call("provider", method=method, path=path, signed=signed, note=note)

    @staticmethod
    def poll(method: str, path: str, *, note: str = "") -> Call:
        return Call("provider", method=method, path=path, repeat=True, note=note)

    @staticmethod
    def target(name: str, op: str, *, note: str = "") -> Call:
        return Call("target", name=name, op=op, note=note)

    @staticmethod
    def probe(name: str, op: str, *, note: str = "") -> Call:
        return Call("probe", name=name, op=op, repeat=True, note=note)

    @staticmethod
    def wait(note: str) -> Call:
        return Call("wait", note=note)

    def provider_requests(self) -> list[str]:
        """The provider routes this call sends, in order ("METHOD template")."""
        if self.what != "provider":
            return []
        handshake = ["POST /auth/action/init", "POST /auth/action"] if self.signed else []
        return [*handshake, f"{self.method} {self.path}"]

    def describe(self) -> str:
        if self.what == "provider":
            text = f"{'signed ' if self.signed else ''}{self.method} {self.path}"
        elif self.what == "wait":
            text = f"wait for {self.note}"
        else:
            text = f"{self.what} {self.name}: {self.op}"
        if self.repeat:
            text += " (polled)"
        if self.note and self.what != "wait":
            text += f" ({self.note})"
        return text


@dataclass(frozen=True)
class PlannedAction:
    trigger: Trigger
    phase: Phase
    name: str
    calls: tuple[Call, ...]
    irreversible: bool = False


# ----------------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Outcome:
    """What an action returns when its outcome carries secrets the provider generated: they are
    stored in the same commit as the outcome, at once (nothing else holds them)."""

    detail: Detail
    secrets: tuple[SealedSecret, ...] = ()


def _no_calls(_facts: Facts) -> Sequence[Call]:
    return ()


@dataclass(frozen=True)
class Action(Generic[C]):
    """One external effect of a step, run with intent before effect.

    - ``prepare``: before the intent, when the action is not done yet (seal new material; it is
      written with the intent);
    - ``run``: the call; its detail (ids, fingerprints, never secrets) is the outcome;
    - ``reconcile``: after an intent without an outcome, what the provider already holds
      (adopted instead of acting twice), or None to act again;
    - ``done``: applies the outcome to the rotation data (also when resuming past it);
    - ``when``: whether the step performs it at all, from the facts (the plan uses it too);
    - ``plan``: the calls it makes, from the facts, without making any;
    - ``irreversible``: from its intent on, rollback is refused;
    - ``each_target``: one action per deploy target of the credential, named
      ``<name>@<target>``, in the targets' configured order (so a crash between two targets is
      a boundary of its own); ``ctx.target`` and ``facts.target`` name the target.
    """

    phase: Phase
    name: str
    run: Callable[[C], Awaitable[Detail | Outcome]]
    plan: Callable[[Facts], Sequence[Call]] = _no_calls
    reconcile: Callable[[C], Awaitable[Detail | None]] | None = None
    intent: Callable[[C], Mapping[str, Any]] | None = None
    prepare: Callable[[C], Awaitable[None]] | None = None
    done: Callable[[C, Detail], None] | None = None
    when: Callable[[Facts], bool] = always
    irreversible: bool = False
    each_target: bool = False
    #: Set on the copies :meth:`Step.expand` makes of an ``each_target`` action.
    target: str | None = None


#: An action outcome's ``notify`` value asking for the person's first invitation.
USER_TASK = "user_task"


def user_task(to: str, due: datetime, link_ref: str | None = None, **detail: Any) -> Detail:
    """An action's outcome detail that also asks for a ``user_task`` notification: a task for
    the person `to` (a username), due at `due` (schedule time), with the sealed link `link_ref`
    (a secret id the deliverer opens at send time; never the link itself). The engine records
    it as one ``run`` event with the outcome (so it is notified once, also when the outcome is
    adopted after a crash)."""
    return {
        **detail,
        "notify": USER_TASK,
        "to": to,
        "due": due.isoformat(),
        "link_ref": link_ref,
    }


@dataclass(frozen=True)
class Wait(Generic[C]):
    """A condition a step waits for (a holder, a bake time, an approval, a person).

    ``check`` returns None once it holds, or the words of what it still waits for. Until then
    the rotation is *waiting*: it records what for and since when, releases its lease and its
    worker slot, and is claimed again ``every(ctx)`` seconds later. A check is not an attempt
    and spends no retry budget; only the deadline (``deadline(ctx)`` seconds after the wait
    began) ends it, by halting the rotation with the reason.

    A wait on a person declares ``remind``: the :class:`Reminders` of the task (None: none).
    Their ``due`` is then the wait's deadline (``deadline`` is not used), reminders go out as
    ``reminder`` events (notified as ``reminder``) at their offsets, and at ``due`` an
    ``escalated`` one; ``on_due`` says whether the rotation then halts or is left waiting,
    overdue. Each check is scheduled at the earliest of ``every``, the next reminder and
    ``due``."""

    phase: Phase
    name: str
    check: Callable[[C], Awaitable[str | None]]
    every: Callable[[C], float]
    deadline: Callable[[C], float]
    plan: Callable[[Facts], Sequence[Call]] = _no_calls
    when: Callable[[Facts], bool] = always
    remind: Callable[[C], Reminders | None] | None = None


@dataclass(frozen=True)
class Finish:
    """What a step's final transition writes besides the state: the managed credential's new
    current side, and key retention (secret id -> purge time; None keeps it)."""

    credential: ManagedCredential | None = None
    purge_after: Mapping[str, datetime | None] = field(default_factory=dict)
    detail: Detail = field(default_factory=dict)


@dataclass(frozen=True)
class Step(Generic[C]):
    items: Sequence[Action[C] | Wait[C]]
    finish: Callable[[C], Awaitable[Finish]] | None = None

    @property
    def actions(self) -> list[Action[C]]:
        """The declared actions (an ``each_target`` one once, unexpanded)."""
        return [i for i in self.items if isinstance(i, Action)]

    def expand(self, targets: Sequence[str]) -> list[Action[C] | Wait[C]]:
        """The items a rotation of a credential with these targets runs, in order: an
        ``each_target`` action becomes one action per target."""
        out: list[Action[C] | Wait[C]] = []
        for item in self.items:
            if isinstance(item, Action) and item.each_target:
                out.extend(
                    dataclasses.replace(item, name=f"{item.name}@{t}", target=t) for t in targets
                )
            else:
                out.append(item)
        return out

    def expanded_actions(self, targets: Sequence[str]) -> list[Action[C]]:
        return [i for i in self.expand(targets) if isinstance(i, Action)]


# ---------------------------------------------------------------------------- reconcile


@dataclass(frozen=True)
class Finding:
    kind: str  # "orphan", "mismatch", "unreachable"
    credential: str
    message: str
    rotation_id: str | None = None
    provider_credential_uuid: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "credential": self.credential,
            "message": self.message,
            "rotation_id": self.rotation_id,
            "provider_credential_uuid": self.provider_credential_uuid,
        }


@dataclass(frozen=True)
class ReconcileInput:
    """One managed credential, its configuration and its rotations (newest first) with their
    action records, for a kind's read-only comparison with the provider."""

    managed: ManagedCredential
    config: CredentialConfig
    rotations: Sequence[Rotation]
    actions: Mapping[str, Sequence[ActionRecord]]
    #: Ids of every rotation the store knows (of any credential).
    known_rotations: frozenset[str]


# ------------------------------------------------------------------------------------ import


@dataclass(frozen=True)
class ImportSpec:
    """What `keyturn credentials import` needs for this kind."""

    #: The material file's option and what it holds ("--private-key-file", "private key").
    material_option: str = "--private-key-file"
    material_purpose: str = "private_key"
    needs_uuid: bool = True
    #: A bearer token is needed (from --token-file or the config's token_env/token_file).
    needs_token: bool = True
    #: The material is text whose surrounding whitespace (a trailing newline) is not part of
    #: it; binary material is stored exactly as read.
    strip_material: bool = False


# --------------------------------------------------------------------------------- services


@dataclass(frozen=True)
class ProviderAccess:
    """How to call the provider as one managed credential: where it is, the credential's
    bearer token, the installation's request budget for that provider, the lease's fence (a
    session calls it before every write) and, when asked for, the credential's current signing
    key. A kind turns it into a session with a factory (see :func:`keyturn.plugin.dfns_session`)."""

    credential: str
    provider: str
    base_url: str
    token: str = field(repr=False)
    timeout_seconds: float
    budget: RequestBudget | None = None
    fence: Fence | None = None
    key: SigningKey | None = field(default=None, repr=False)
    #: Told of every request the session sends (this process's provider metrics), if any.
    observe: RequestObserver | None = None


class Services(Protocol):
    """What keyturn gives plugins at run time (the composition root implements it). Nothing
    here blocks the event loop."""

    def credential_config(self, name: str) -> CredentialConfig: ...

    async def provider_session(
        self,
        factory: Callable[[ProviderAccess], S],
        credential: str,
        *,
        with_key: bool = False,
        fence: Fence | None = None,
    ) -> S:
        """``factory(access)`` for the managed credential `credential` (its provider, its token,
        and its current signing key when `with_key`); KeyturnError when that is missing."""

    async def blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking call in keyturn's bounded thread pool (sized from the worker's
        concurrency), never on the event loop."""

    def algorithm_of(self, private_pem: bytes) -> str:
        """The algorithm of a private key (KeyturnError if it is not one)."""

    def now(self) -> datetime:
        """The time on the schedule's clock (which a test may run faster)."""

    async def rotation(self, rotation_id: str) -> Rotation:
        """A rotation as stored now (NotFound for an unknown id)."""

    async def evidence(self, rotation_id: str) -> dict[str, Detail]:
        """The evidence recorded on a rotation by name (its detail, the time under "at")."""

    async def add_evidence(
        self, rotation_id: str, name: str, detail: Mapping[str, Any], *, actor: str
    ) -> bool:
        """Record evidence given outside a worker (a person's page, an operator's command) on
        the rotation's timeline, once per name (False when it was there already), and make
        the rotation due now so a worker looks at it at once."""

    async def open_secret(self, ref: str) -> bytes:
        """Open a sealed secret by its id (KeyturnError when it is purged or unknown)."""

    def boundary(self, name: str) -> None:
        """A named point between an effect and its record, outside the engine (a person's
        page): a crash test may kill the process there (KEYTURN_TEST_CRASH_AT)."""


class Operations(Services, Protocol):
    """What a plugin's own commands (``keyturn.commands`` entry points) may do, besides what
    its steps may: add managed credentials (members of an entry) and start rotations."""

    def add_member(
        self, entry: str, member: str, *, credential_id: str, credential_uuid: str, algorithm: str
    ) -> ManagedCredential:
        """The managed credential ``ENTRY:MEMBER`` (added, or the one there already)."""

    def start(
        self, credential: str, *, reason: str, actor: str, options: Mapping[str, Any]
    ) -> Rotation:
        """A pending rotation of the managed credential (KeyturnError when one is unfinished)."""

    def rotations_of(self, kind: str) -> list[Rotation]:
        """Every rotation of the kind, newest first."""

    def members(self, entry: str) -> list[str]:
        """The members of an entry keyturn manages (sorted)."""

    def campaign_progress(self, campaign: str | None = None) -> dict[str, dict[str, int]]:
        """{campaign: {progress label: count}} (see :meth:`KindPlugin.progress_label`)."""

    def actor(self) -> str:
        """Who runs this command (for the audit trail)."""

    def print(self, text: str) -> None:
        """Say one thing on standard output (plain text)."""


class Session(Protocol):
    async def aclose(self) -> None: ...


# ------------------------------------------------------------------------- targets, probes


@dataclass(frozen=True)
class TargetOp:
    """Which rotation a target's cycle call belongs to: its idempotency key (a second call for
    the same rotation and phase with the same material writes nothing)."""

    rotation_id: str
    credential: str
    #: "stage", "promote" or "rollback".
    phase: str


class KeyTarget(Protocol):
    """A target of signing-key material (``accepts`` holds "signing_key"): one cycle, every
    call idempotent and a no-op when the content is already there.

    - ``stage``: write the new material where holders do not read it yet;
    - ``read_back``: what holders load now (``staged=True``: what ``stage`` wrote);
    - ``promote``: make the staged material (it must equal `material`) what holders load;
    - ``rollback``: make `previous` what holders load again (the version before `op`'s
      promote, when the target keeps one).

    A target marks what it manages (a tag, label or metadata naming keyturn and the credential)
    and refuses to overwrite what it does not manage unless its config says ``adopt = true``;
    it never deletes. Errors are :class:`StepError` naming the target (``retryable`` when
    trying again may help: unreachable, throttled) and never hold secret material. The detail
    returned (``changed``, a version id) goes in the action record: no secrets."""

    name: str

    async def stage(self, material: Any, op: TargetOp) -> Detail: ...

    async def read_back(self, *, staged: bool = False) -> Any: ...

    async def promote(self, material: Any, op: TargetOp) -> Detail: ...

    async def rollback(self, previous: Any, op: TargetOp) -> Detail: ...


class KeyProbe(Protocol):
    """Holder evidence for signing-key material (``accepts`` holds "signing_key"): which key
    the holder signs with now, as the fingerprint keyturn records for a key (the first 16 hex
    digits of SHA-256 over the public key's PEM with all whitespace removed; see
    :func:`keyturn.holders.key_fingerprint`). KeyturnError naming the probe when it cannot
    tell (the holder is down, answers nonsense): the rotation keeps waiting."""

    name: str

    async def fingerprint(self) -> str: ...


class TargetPlugin(Protocol):
    """A deploy target type (``type = "..."``)."""

    type: str
    description: str
    config_model: builtins.type[TargetConfig]
    #: The material it takes: a kind's :attr:`KindPlugin.material` must be in this set.
    accepts: frozenset[str]

    def build(self, config: TargetConfig, services: Services) -> Any:
        """The target for this configuration, with a ``name``: a :class:`KeyTarget` (the
        stage / read_back / promote / rollback cycle) for "signing_key"; async
        ``deploy(secrets)`` and ``read_back()`` for "secret_set" (deploying both secrets
        of a rotation is its own staging)."""


class ProbePlugin(Protocol):
    type: str
    description: str
    config_model: builtins.type[ProbeConfig]
    accepts: frozenset[str]

    def build(self, config: ProbeConfig, services: Services) -> Any: ...


# ------------------------------------------------------------------------------------ kinds


class KindPlugin(Protocol):
    """A credential kind. See :class:`keyturn.plugin.Kind` for the base class with defaults."""

    name: str
    description: str
    config_model: type[CredentialConfig]
    data_model: type[RotationData]
    #: What its targets receive ("signing_key", "secret_set", ...).
    material: str
    #: Its current key can sign provider calls made for other credentials (their signer).
    signs_requests: bool
    import_spec: ImportSpec
    #: Its steps by the trigger each fires; FINISH_ROLLBACK is the rollback.
    steps: Mapping[Trigger, Step[Any]]

    def check_config(
        self, name: str, config: CredentialConfig, signers: Collection[str]
    ) -> str | None:
        """A problem across keys or credentials (one line naming the key and the fix), or None.
        `signers`: the configured credentials whose kind can sign provider calls."""

    def options(self, config: CredentialConfig) -> dict[str, Any]:
        """The rotate options the configuration implies (recorded with the rotation)."""

    def start(self, credential: ManagedCredential, options: Mapping[str, Any]) -> RotationData:
        """The new rotation's data (KeyturnError when the credential cannot be rotated)."""

    def signer(self, config: CredentialConfig) -> str | None:
        """Another managed credential whose key signs this kind's provider calls, if any."""

    def retained(self, data: Any) -> Sequence[str]:
        """Secret ids a rollback needs (the old side's material)."""

    def identities(self, data: Any) -> dict[str, str | None]:
        """The old and new side's provider ids, for people (keys start with old_ or new_)."""

    def irreversible_words(self) -> str:
        """What to add when rollback is refused after an irreversible action ('' for nothing)."""

    #: The words of a campaign's progress, in the order a rotation moves through them.
    progress_labels: Sequence[str]

    def progress_label(self, rotation: Rotation, now: datetime) -> str:
        """Where a rotation of a campaign is, in one of :attr:`progress_labels`."""

    def user_app(self, services: Services) -> Any | None:
        """Pages for the people a rotation of this kind waits on (an ASGI app), served by
        ``keyturn serve --user-port`` under ``/<kind name>``, on its own origin and never next
        to the operator routes; None: the kind has none."""

    async def open_session(self, services: Services, rotation: Rotation, fence: Fence) -> Any:
        """The provider session a step's actions use (closed by the engine afterwards)."""

    async def reconcile(self, services: Services, item: ReconcileInput) -> list[Finding]:
        """Compare the provider with what the store says (read only)."""

    def imported(
        self, name: str, config: CredentialConfig, material: bytes, services: Services
    ) -> str:
        """Check an imported credential's material (KeyturnError naming the problem); the
        algorithm recorded for it."""

    async def verify_import(
        self, access: ProviderAccess, credential_id: str, credential_uuid: str, material: bytes
    ) -> None:
        """Check at the provider, before anything is stored, that the credential being
        imported exists, is active and that `material` is its (KeyturnError naming what is
        wrong). `access` acts with the imported token."""


#: Groups of entry points plugins register under.
KIND_GROUP = "keyturn.kinds"
TARGET_GROUP = "keyturn.targets"
PROBE_GROUP = "keyturn.probes"


class Kind:
    """Defaults for a kind; subclass it and set the class attributes."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    config_model: ClassVar[type[CredentialConfig]] = CredentialConfig
    data_model: ClassVar[type[RotationData]] = RotationData
    material: ClassVar[str] = "signing_key"
    signs_requests: ClassVar[bool] = False
    import_spec: ClassVar[ImportSpec] = ImportSpec()
    steps: Mapping[Trigger, Step[Any]] = {}

    def check_config(
        self, name: str, config: CredentialConfig, signers: Collection[str]
    ) -> str | None:
        return None

    def options(self, config: CredentialConfig) -> dict[str, Any]:
        return {}

    def signer(self, config: CredentialConfig) -> str | None:
        return None

    def retained(self, data: Any) -> Sequence[str]:
        return ()

    def identities(self, data: Any) -> dict[str, str | None]:
        return {}

    def irreversible_words(self) -> str:
        return ""

    progress_labels: ClassVar[Sequence[str]] = (
        "pending",
        "new_added",
        "verified",
        "old_deactivated",
        "rolled_back",
        "cancelled",
    )

    def progress_label(self, rotation: Rotation, now: datetime) -> str:
        return rotation.state.value

    def user_app(self, services: Services) -> Any | None:
        return None

    async def reconcile(self, services: Services, item: ReconcileInput) -> list[Finding]:
        return []

    def imported(
        self, name: str, config: CredentialConfig, material: bytes, services: Services
    ) -> str:
        return self.material

    async def verify_import(
        self, access: ProviderAccess, credential_id: str, credential_uuid: str, material: bytes
    ) -> None:
        return None

"""The user pages' view of keyturn (:class:`~.tasks.PasskeyTasks` over the plugin services):
links checked against the rotation as stored, evidence recorded on its timeline."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from keyturn.kinds.passkey import tasks as t
from keyturn.kinds.passkey.kind import PasskeyConfig, PasskeyData
from keyturn.plugin import KeyturnError, Rotation, Services, dfns_passkey_session

_UNKNOWN = "this link is not valid; use the newest link keyturn sent you"
FINISHED = "there is nothing left to do: this passkey change is finished"
#: The end states a user's own last step leads to.
_ENDED_BY_USER = ("old_deactivated", "rolled_back")


class ServicesTasks(t.PasskeyTasks):
    def __init__(self, services: Services) -> None:
        self.services = services

    async def _rotation(self, rotation_id: str) -> Rotation:
        try:
            rotation = await self.services.rotation(rotation_id)
        except KeyturnError:
            raise t.LinkRefused(_UNKNOWN) from None
        if rotation.kind != "passkey":
            raise t.LinkRefused(_UNKNOWN)
        return rotation

    async def open_link(self, token: str) -> t.LinkTask:
        rotation_id = t.link_rotation(token)
        if rotation_id is None:
            raise t.LinkRefused(_UNKNOWN)
        rotation = await self._rotation(rotation_id)
        data = PasskeyData.model_validate(rotation.data)
        if not t.link_matches(token, data.link_hash):
            raise t.LinkRefused(
                "this link was replaced by a newer one or is not valid; use the newest link "
                "keyturn sent you"
            )
        return await self._task(rotation)

    async def task(self, rotation_id: str) -> t.LinkTask:
        return await self._task(await self._rotation(rotation_id), session=True)

    async def _task(self, rotation: Rotation, *, session: bool = False) -> t.LinkTask:
        data = PasskeyData.model_validate(rotation.data)
        # a page session whose user's last step ended the rotation sees it done (a worker may
        # finish the rotation between that step and the page's reload); nobody else does
        done = session and rotation.finished and rotation.state.value in _ENDED_BY_USER
        if rotation.finished and not done:
            raise t.LinkRefused(FINISHED)
        if rotation.paused:
            raise t.LinkRefused("this passkey change is paused by an administrator; try later")
        if data.link_hash is None or data.link_task is None or data.link_expires is None:
            raise t.LinkRefused(_UNKNOWN)
        expires = datetime.fromisoformat(data.link_expires)
        if not done and self.services.now() >= expires:
            raise t.LinkRefused(
                f"this link expired at {data.link_expires}; ask your administrator for a new one"
            )
        evidence = await self.services.evidence(rotation.id)
        config = self.services.credential_config(rotation.credential)
        assert isinstance(config, PasskeyConfig)
        task: t.Task = "enrol"
        if data.link_task in ("deactivate", "rollback"):
            task = data.link_task  # type: ignore[assignment]
        return t.LinkTask(
            rotation_id=rotation.id,
            username=data.username,
            user_id=data.user_id,
            old_credential_uuid=data.old_credential_uuid,
            old_credential_id=data.old_credential_id,
            task=task,
            origin=config.origin,
            new_origin=data.new_origin,
            may_deactivate=data.new_origin is None or t.CUTOVER in evidence,
            new_credential_uuid=data.new_credential_uuid,
            new_credential_id=data.new_credential_id,
            evidence=frozenset(evidence),
            expires_at=expires,
            link_hash=data.link_hash,
            finished=done,
        )

    async def record(self, rotation_id: str, name: str, detail: Mapping[str, Any]) -> bool:
        rotation = await self._rotation(rotation_id)
        data = PasskeyData.model_validate(rotation.data)
        if name.startswith(f"{t.SNOOZED}:"):
            config = self.services.credential_config(rotation.credential)
            assert isinstance(config, PasskeyConfig)
            try:
                n = int(name.split(":", 1)[1])
            except ValueError:
                raise t.LinkRefused("that snooze is not valid") from None
            if not 1 <= n <= config.snoozes:
                raise t.LinkRefused(
                    f"you have snoozed {config.snoozes} times, the most allowed; please act "
                    f"before {data.due}"
                )
        return await self.services.add_evidence(
            rotation_id, name, detail, actor=f"user:{data.username}"
        )

    def boundary(self, name: str) -> None:
        """Between a user's write at the provider and its evidence (a crash test's point)."""
        self.services.boundary(f"pages.{name}")

    async def provider(self, rotation_id: str) -> Any:
        rotation = await self._rotation(rotation_id)
        config = self.services.credential_config(rotation.credential)
        assert isinstance(config, PasskeyConfig)
        return await self.services.provider_session(
            dfns_passkey_session, config.signer, with_key=True
        )

"""Property tests of the pure schedule (keyturn.domain.schedule) over random schedules, windows,
freezes and time zones, across the DST changes of Europe/Berlin and America/New_York.

Every computed start lies in a window, outside every freeze that applies, after min_age and at
least the stagger from the group's other starts; every deactivation time lies in a window and
outside every freeze; an unsatisfiable combination is refused at load (its problems are named).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyturn.config import load_config
from keyturn.domain import schedule as sch
from keyturn.domain.errors import ConfigError

ZONES = ["Europe/Berlin", "America/New_York", "UTC"]
# Around the 2026/2027 DST changes of both zones (Mar 8/29, Oct 25, Nov 1 2026; Mar 14/28 2027).
BASE = datetime(2026, 2, 20, tzinfo=UTC)
SPAN_DAYS = 420

instants = st.integers(0, SPAN_DAYS * 24 * 60).map(lambda m: BASE + timedelta(minutes=m))
durations = st.integers(1, 60 * 24 * 40).map(lambda m: timedelta(minutes=m))


@st.composite
def windows(draw: st.DrawFn) -> sch.Window:
    days = draw(st.frozensets(st.integers(0, 6), min_size=1, max_size=7))
    start = draw(st.integers(0, 23 * 60)) // 15 * 15
    end = draw(st.integers(start + 15, 24 * 60))
    return sch.Window(days, start, end, draw(st.sampled_from(ZONES)))


@st.composite
def freezes(draw: st.DrawFn) -> sch.Freeze:
    start = draw(instants)
    length = timedelta(hours=draw(st.integers(1, 24 * 20)))
    groups = draw(st.sampled_from([frozenset(), frozenset({"g"}), frozenset({"other"})]))
    return sch.Freeze(start, start + length, "test freeze", groups)


@st.composite
def policies(draw: st.DrawFn) -> sch.Policy:
    tz = draw(st.sampled_from(ZONES))
    trigger = draw(st.sampled_from(["every", "cron", "max_age"]))
    every = draw(durations) if trigger == "every" else None
    cron = (
        draw(
            st.sampled_from(
                ["0 9 * * TUE", "30 2 * * *", "0 */6 * * *", "15 1 * * SUN", "0 0 1 * *"]
            )
        )
        if trigger == "cron"
        else None
    )
    max_age = draw(durations) if trigger == "max_age" else None
    return sch.Policy(
        name="p",
        every=every,
        cron=cron,
        timezone=tz,
        max_age=max_age,
        min_age_=draw(
            st.one_of(st.none(), st.integers(0, 60 * 24 * 10).map(lambda m: timedelta(minutes=m)))
        ),
        windows=tuple(draw(st.lists(windows(), max_size=3))),
        jitter=timedelta(minutes=draw(st.integers(0, 240))),
        stagger=timedelta(minutes=draw(st.integers(0, 180))),
        group="g",
    )


def _allowed(p: sch.Policy, fz: list[sch.Freeze], at: datetime) -> bool:
    return sch.in_windows(p.windows, at) and sch.freeze_at(fz, p.group, at) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=policies(),
    fz=st.lists(freezes(), max_size=4),
    created=instants,
    now_after=st.integers(0, 60 * 24 * 90).map(lambda m: timedelta(minutes=m)),
    n_peers=st.integers(1, 6),
)
def test_every_start_is_allowed_aged_and_staggered(
    policy: sch.Policy, fz: list[sch.Freeze], created: datetime, now_after: timedelta, n_peers: int
) -> None:
    now = created + now_after
    starts: list[datetime] = []
    for i in range(n_peers):
        start = sch.next_start(policy, fz, f"cred-{i}", created, now, peers=starts)
        if start is None:  # only when nothing is allowed within the horizon (refused at load)
            assert sch.allowed_at(policy.windows, fz, policy.group, now) is None
            continue
        assert _allowed(policy, fz, start.at), start
        assert start.at >= now
        assert start.slot >= created + policy.min_age
        assert start.at >= created + policy.min_age
        for other in starts:
            assert abs(start.at - other) >= policy.stagger, (start, other)
        starts.append(start.at)
        # deterministic: plan and scheduler agree
        again = sch.next_start(policy, fz, f"cred-{i}", created, now, peers=starts[:-1])
        assert again == start


@settings(max_examples=300, deadline=None)
@given(policy=policies(), fz=st.lists(freezes(), max_size=4), earliest=instants)
def test_every_deactivation_is_in_a_window_outside_freezes(
    policy: sch.Policy, fz: list[sch.Freeze], earliest: datetime
) -> None:
    at = sch.deactivation_at(policy, fz, earliest)
    if at is None:
        return
    assert at >= earliest
    assert _allowed(policy, fz, at)
    assert sch.gate(policy, fz, at) is None
    # nothing allowed was skipped: a minute-step scan between earliest and `at` finds no
    # earlier allowed minute boundary (checked over the first day only, to stay fast)
    t = earliest
    while t < min(at, earliest + timedelta(days=1)) - timedelta(minutes=1):
        t = t + timedelta(minutes=1)
        if t.second == 0 and t.microsecond == 0:
            assert not _allowed(policy, fz, t) or t >= at, (t, at)


@settings(max_examples=200, deadline=None)
@given(policy=policies(), fz=st.lists(freezes(), max_size=3), at=instants)
def test_gate_says_when_it_opens(policy: sch.Policy, fz: list[sch.Freeze], at: datetime) -> None:
    blocked = sch.gate(policy, fz, at)
    if _allowed(policy, fz, at):
        assert blocked is None
        return
    assert blocked is not None
    until, why = blocked
    assert until > at and why
    if until < at + sch.HORIZON:
        assert _allowed(policy, fz, until)


@settings(max_examples=100, deadline=None)
@given(credential=st.text(min_size=1, max_size=20), slot=instants, minutes=st.integers(1, 600))
def test_jitter_is_deterministic_and_bounded(credential: str, slot: datetime, minutes: int) -> None:
    j = timedelta(minutes=minutes)
    a = sch.jitter_of(credential, slot, j)
    assert a == sch.jitter_of(credential, slot, j)
    assert timedelta(0) <= a < j


@pytest.mark.parametrize(
    "zone_name,day",
    [("Europe/Berlin", "2026-03-29"), ("America/New_York", "2026-03-08"),
     ("Europe/Berlin", "2026-10-25"), ("America/New_York", "2026-11-01")],
)  # fmt: skip
def test_a_window_in_the_dst_gap_or_overlap_still_opens_inside_it(zone_name: str, day: str) -> None:
    """02:00-03:00 local does not exist on the spring change: the start lands the next day,
    inside the window; on the autumn change it exists twice: the first reading is taken."""
    w = sch.Window(frozenset(range(7)), 120, 180, zone_name)
    midnight = datetime.fromisoformat(day).replace(tzinfo=sch.zone(zone_name)).astimezone(UTC)
    at = sch.allowed_at((w,), [], None, midnight)
    assert at is not None and w.contains(at)
    local = at.astimezone(sch.zone(zone_name))
    assert local.hour == 2


# ------------------------------------------------------------------------ refused at load

CONFIG = """
[keys]
master_key_file = "m.key"
[providers.p]
base_url = "http://127.0.0.1:1"
[policies.payments]
{policy}
{freeze}
[credentials.a]
kind = "service_account"
provider = "p"
policy = "{name}"
[[credentials.a.targets]]
path = "d"
"""


@pytest.mark.parametrize(
    "policy,freeze,name,key,words",
    [
        ('every = "90d"\ntimezone = "Mars/Olympus"', "", "payments",
         "policies.payments.timezone", "unknown time zone"),
        ('cron = "61 9 * * TUE"', "", "payments", "policies.payments.cron", "does not parse"),
        ('cron = "0 8 * * MON"\ntimezone = "Europe/Berlin"\n'
         'windows = [{days = ["tue"], hours = "09:00-16:00"}]', "", "payments",
         "policies.payments.windows", "no window ever overlaps the schedule"),
        ('every = "7d"', '[[freeze]]\nfrom = 2020-01-01T00:00:00Z\nto = 2099-01-01T00:00:00Z\n'
         'reason = "forever"', "payments", "freeze[0]", "covers every future slot"),
        ('every = "7d"', "", "nope", "credentials.a.policy", "no policy named 'nope'"),
        ('every = "1d"\nbake = "36h"', "", "payments", "policies.payments.bake",
         "longer than the interval"),
        ('every = "1d"\nwindows = [{days = ["tue"], hours = "16:00-09:00"}]', "", "payments",
         "policies.payments.windows[0]", "START before END"),
        ('every = "1x"', "", "payments", "policies.payments.every", "does not parse"),
    ],
)  # fmt: skip
def test_unsatisfiable_is_refused_at_load(
    tmp_path: Path, policy: str, freeze: str, name: str, key: str, words: str
) -> None:
    path = tmp_path / "keyturn.toml"
    path.write_text(CONFIG.format(policy=policy, freeze=freeze, name=name))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert f"config file {path}: key {key}:" in message, message
    assert words in message, message


def test_a_satisfiable_policy_loads_with_its_overrides(tmp_path: Path) -> None:
    path = tmp_path / "keyturn.toml"
    text = CONFIG.format(
        policy='every = "90d"\ngroup = "pay"\nstagger = "10m"', freeze="", name="payments"
    )
    path.write_text(text + '[credentials.a.schedule]\njitter = "2h"\n')
    policy = load_config(path).policy_of("a")
    assert policy is not None
    assert policy.every == timedelta(days=90)
    assert policy.jitter == timedelta(hours=2)
    assert policy.min_age == timedelta(days=45)  # half the interval by default

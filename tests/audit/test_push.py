"""Push notifications go through the real firebase-admin code path to a local fake FCM server."""

from __future__ import annotations

import json
import uuid

import pytest

from actors.outbox.audit import AuditServices
from actors.outbox.push import notices_for
from kairos import rules, wire
from kairos.commands import Create, ParticipantSpec, Start, Tick
from tests.audit.audit_messages import Lifecycle
from tests.audit.conftest import append, eventually, fetch
from tests.audit.fake_fcm import FakeFcm

pytestmark = pytest.mark.anyio

def test_notices_follow_the_events() -> None:
    life = Lifecycle()
    life.create()
    assert notices_for(json.loads(life.start())) == []
    switched = notices_for(json.loads(life.switch(warn=True)))
    assert [(n.participant_id, n.event_type, n.title) for n in switched] == [
        (life.players[1], "cycle_switched", "Your turn"),
        (life.players[1], "time_warning", "Time running low"),
    ]
    assert "0:20 left" in switched[1].body
    paused = notices_for(json.loads(life.pause()))
    assert sorted(n.participant_id for n in paused) == sorted(life.players)


def test_a_team_whose_shared_bank_runs_out_is_told_together() -> None:
    now = 1_790_000_000_000
    team_a, team_b = str(uuid.uuid4()), str(uuid.uuid4())
    people = [ParticipantSpec(str(uuid.uuid4()), 5_000, group_id=g) for g in (team_a, team_b, team_a, team_b)]
    sid = str(uuid.uuid4())
    state = rules.apply(None, Create(session_id=sid, sync_mode="per_group", participants=tuple(people),
                                     owner="o"), now).state
    state = rules.apply(state, Start(), now).state
    out = rules.apply(state, Tick(), now + 60_000)  # team A's bank is long gone
    notices = notices_for(json.loads(wire.update_message(out.state, out.events, now + 60_000, sid)))
    told = {n.participant_id for n in notices if n.event_type == "participant_expired"}
    assert told == {people[0].participant_id, people[2].participant_id}
    assert {n.participant_id for n in notices if n.event_type == "session_expired"} == {
        p.participant_id for p in people}


async def test_lifecycle_pushes_reach_fcm_and_unregistered_tokens_are_deleted(
    redis, keys, key_prefix: str, database_url: str, fake_fcm: FakeFcm, service_account: str
) -> None:
    life = Lifecycle()
    a, b = life.players
    dead = f"dead-{life.session_id}"
    fake_fcm.unregistered.add(dead)
    async with AuditServices(redis, key_prefix=key_prefix, database_url=database_url,
                             consumer="push-test", fcm_credentials=service_account,
                             fcm_endpoint=fake_fcm.url) as services:
        await services.register_device(a, f"tok-a-{life.session_id}", "android")
        await services.register_device(b.upper(), f"tok-b-{life.session_id}", "ios")
        await services.register_device(b, dead, "web")
        ta, tb = f"tok-a-{life.session_id}", f"tok-b-{life.session_id}"
        # One change at a time, so the order of deliveries is checked too. Switches go to the
        # new active player (b, a, b); pause/resume/complete to both.
        steps = [
            (life.create(), []), (life.start(), []),
            (life.switch(), [(tb, "cycle_switched")]), (life.switch(), [(ta, "cycle_switched")]),
            (life.switch(), [(tb, "cycle_switched")]),
            (life.pause(), [(ta, "session_paused"), (tb, "session_paused")]),
            (life.resume(), [(ta, "session_resumed"), (tb, "session_resumed")]),
            (life.complete(), [(ta, "session_completed"), (tb, "session_completed")]),
        ]
        expected: list[tuple[str, str]] = []
        for message, deliveries in steps:
            await append(redis, keys, [message])
            expected += deliveries

            async def delivered(n: int = len(expected)) -> bool:
                return len(fake_fcm.sent) >= n

            await eventually(delivered, what=f"{len(expected)} notifications delivered")
            got = [(m["token"], m["data"]["event"]) for m in fake_fcm.sent]
            assert sorted(got) == sorted(expected)
        assert len(fake_fcm.sent) == 3 + 6  # three switches, three events to two players
        assert fake_fcm.rejected == [dead]  # tried once, then forgotten
        first = fake_fcm.sent[0]
        assert first["android"]["collapse_key"] == life.session_id
        assert first["apns"]["headers"]["apns-collapse-id"] == life.session_id
        assert first["notification"]["title"] == "Your turn"
        assert fake_fcm.auth_headers == {"Bearer fake-access"}
        tokens = await fetch(database_url, "SELECT token FROM devices WHERE token LIKE $1",
                             f"%{life.session_id}")
        assert sorted(r["token"] for r in tokens) == sorted(
            [f"tok-a-{life.session_id}", f"tok-b-{life.session_id}"])

        async def counted() -> bool:  # the worker counts after FCM (our fake) has answered
            return services.push.results.get("sent") == 9

        await eventually(counted, what="the worker's count")
        assert services.push.results == {"sent": 9, "unregistered": 1}


async def test_push_is_off_without_credentials(redis, key_prefix: str, database_url: str) -> None:
    async with AuditServices(redis, key_prefix=key_prefix, database_url=database_url,
                             consumer="no-push") as services:
        assert services.push is None


async def test_transient_fcm_errors_are_retried(
    redis, keys, key_prefix: str, database_url: str, fake_fcm: FakeFcm, service_account: str
) -> None:
    life = Lifecycle()
    token = f"busy-{life.session_id}"
    fake_fcm.flaky[token] = 2  # FCM answers QUOTA_EXCEEDED twice, then accepts
    async with AuditServices(redis, key_prefix=key_prefix, database_url=database_url,
                             consumer="push-retry", fcm_credentials=service_account,
                             fcm_endpoint=fake_fcm.url) as services:
        await services.register_device(life.players[1], token, "ios")
        await append(redis, keys, [life.create(), life.start(), life.switch()])

        async def delivered() -> bool:
            return services.push.results.get("sent", 0) >= 1  # the worker has seen the answer

        await eventually(delivered, what="delivery after the retries")
        assert services.push.results == {"retried": 2, "sent": 1}
        assert [m["token"] for m in fake_fcm.sent] == [token]
        assert fake_fcm.flaky[token] == 0

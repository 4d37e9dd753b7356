"""The apply contract: one set of tests, two sources (in memory, real Kafka), real PostgreSQL.

Each test drives the applier the way the consumer does (fetch a batch, apply it)
through ``RecordSource``, from a source in memory and from the deployment's Kafka
topic; the outcome in PostgreSQL must be the same. The rebalances the consumer
group would cause are played by the test: a revoke releases the claim, another
member takes a newer epoch.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest

from services.controller.applier import Applier
from services.controller.claims import Ownerships
from services.controller.handlers import Poison
from services.controller.metrics import ControllerMetrics
from services.controller.store import PendingFence
from services.shared.db import create_engine
from tests.support.apply_sources import KafkaLog, Log, MemoryLog, Reader
from tests.support.deployment import Deployment
from tests.support.records import REFUSE_MARKED, encode, heartbeat_record

pytestmark = pytest.mark.timeout(60)

PARTITIONS = 2


class MemoryDeadLetters:
    def __init__(self) -> None:
        self.sent: list[Poison] = []

    async def send(self, poison: Poison) -> None:
        self.sent.append(poison)

    def where(self) -> list[tuple[int, int, str]]:
        return [(p.delivered.partition, p.delivered.offset, p.reason) for p in self.sent]


class Member:
    """One controller's applier and claims, fed by its own reader of the log."""

    def __init__(self, deployment: Deployment, reader: Reader, name: str) -> None:
        self.engine = create_engine(deployment.fleet.database, application_name=name)
        self.metrics = ControllerMetrics()
        self.ownerships = Ownerships(
            self.engine, deployment.fleet.events_topic, name, self.metrics, max_backoff_s=0.1
        )
        self.dead_letters = MemoryDeadLetters()
        self.reader = reader
        self.applier = Applier(
            self.engine,
            self.ownerships,
            self.dead_letters,
            reader,
            self.metrics,
            max_backoff_s=0.1,
        )

    async def claim(self, partitions: list[int]) -> None:
        """What the assignment callback does: claim, then seek to the stored offsets."""
        for partition, claim in (await self.ownerships.claim(partitions, {})).items():
            await self.reader.seek(partition, claim.next_offset)

    async def step(self) -> int:
        batch = await self.reader.fetch()
        await self.applier.apply(batch)
        return len(batch)

    def counted(self, name: str) -> float:
        return self.metrics.registry.get_sample_value(name) or 0.0


class Fleet:
    def __init__(self, deployment: Deployment, log: Log) -> None:
        self.deployment = deployment
        self.log = log
        self.dsn = deployment.fleet.stack.admin_dsn(deployment.fleet.database_name)
        self.members: list[Member] = []

    async def member(self, name: str, partitions: list[int] | None = None) -> Member:
        member = Member(self.deployment, await self.log.reader(), name)
        self.members.append(member)
        await member.claim(self.log.partitions if partitions is None else partitions)
        return member

    async def heartbeats(self, partition: int, seqs: range, *, prefix: str = "ev") -> list[int]:
        customer = f"cust-{partition}"
        return [
            await self.log.append(
                partition,
                customer.encode(),
                encode(heartbeat_record(customer, f"{prefix}-{partition}-{seq}", seq)),
            )
            for seq in seqs
        ]

    def sql(self, statement: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            # No parameters: the simple protocol, which runs several statements.
            cursor = conn.execute(statement.encode(), args or None)
            return cursor.fetchall() if cursor.description else []

    def applied(self, partition: int) -> list[tuple[str, int]]:
        """(event id, offset) of the partition's event records, in offset order."""
        return [
            (str(r[0]), int(r[1]))
            for r in self.sql(
                'SELECT event_id, "offset" FROM event_records WHERE partition = %s '
                'ORDER BY "offset"',
                partition,
            )
        ]

    def stored(self) -> dict[int, tuple[int, str]]:
        """partition -> (next offset, owner) as stored with the effects."""
        return {
            int(r[0]): (int(r[1]), str(r[2]))
            for r in self.sql("SELECT partition, next_offset, owner FROM partition_ownership")
        }

    def take_over(self, partition: int, owner: str) -> None:
        """Another member claims ``partition`` with a newer epoch (as ``take_epoch`` does)."""
        self.sql(
            "UPDATE partition_ownership SET epoch = nextval('ownership_epoch_seq'), owner = %s "
            "WHERE partition = %s",
            owner,
            partition,
        )

    async def close(self) -> None:
        for member in self.members:
            await member.engine.dispose()
        await self.log.close()


@pytest.fixture(params=["memory", "kafka"])
async def fleet(deployment: Deployment, request: pytest.FixtureRequest) -> AsyncIterator[Fleet]:
    log: Log
    if request.param == "memory":
        log = MemoryLog(PARTITIONS)
    else:
        log = await KafkaLog(
            deployment.fleet.stack.kafka_bootstrap, deployment.fleet.events_topic, PARTITIONS
        ).start()
    fleet = Fleet(deployment, log)
    try:
        yield fleet
    finally:
        await fleet.close()


def ids(partition: int, seqs: range, prefix: str = "ev") -> list[str]:
    return [f"{prefix}-{partition}-{seq}" for seq in seqs]


DUPLICATES = "fleetplane_controller_duplicates_skipped_total"
FENCED = "fleetplane_controller_fenced_writes_total"
RETRIES = "fleetplane_controller_database_retries_total"


async def test_a_duplicate_delivered_twice_is_applied_once(fleet: Fleet) -> None:
    member = await fleet.member("contract-a")
    await fleet.heartbeats(0, range(1, 3))
    await fleet.heartbeats(0, range(2, 4))  # the API produced event 2 twice (a client retry)
    await member.step()
    assert fleet.applied(0) == [("ev-0-1", 0), ("ev-0-2", 1), ("ev-0-3", 3)]
    assert fleet.stored()[0] == (4, "contract-a")
    assert member.counted(DUPLICATES) == 1
    assert member.dead_letters.sent == []


async def test_redelivery_after_a_seek_changes_nothing(fleet: Fleet) -> None:
    member = await fleet.member("contract-a")
    for partition in (0, 1):
        await fleet.heartbeats(partition, range(1, 6))
    assert await member.step() == 10
    before = (fleet.applied(0), fleet.applied(1), fleet.stored())
    # A consumer reset to older positions (an offset reset, a rebalance).
    await member.reader.seek(0, 0)
    await member.reader.seek(1, 2)
    assert await member.step() == 8
    assert (fleet.applied(0), fleet.applied(1), fleet.stored()) == before
    assert member.counted(DUPLICATES) == 8
    await fleet.heartbeats(0, range(6, 7))
    await member.step()
    assert fleet.applied(0)[-1] == ("ev-0-6", 5)
    assert fleet.stored()[0] == (6, "contract-a")


async def test_poison_in_the_middle_of_a_batch_is_dead_lettered_and_the_rest_applied(
    fleet: Fleet,
) -> None:
    member = await fleet.member("contract-a")
    await fleet.heartbeats(0, range(1, 2))
    await fleet.log.append(0, b"cust-0", b"not json")
    await fleet.heartbeats(0, range(2, 4))
    await fleet.heartbeats(1, range(1, 3))
    await member.step()
    assert member.dead_letters.where() == [(0, 1, "undecodable")]
    assert fleet.applied(0) == [("ev-0-1", 0), ("ev-0-2", 2), ("ev-0-3", 3)]
    assert fleet.applied(1) == [("ev-1-1", 0), ("ev-1-2", 1)]
    assert fleet.stored() == {0: (4, "contract-a"), 1: (2, "contract-a")}


async def test_a_record_the_database_refuses_is_dead_lettered_alone(fleet: Fleet) -> None:
    fleet.sql(REFUSE_MARKED)
    member = await fleet.member("contract-a")
    await fleet.heartbeats(0, range(1, 3))
    await fleet.heartbeats(0, range(3, 4), prefix="refused")
    await fleet.heartbeats(0, range(4, 6))
    await fleet.heartbeats(1, range(1, 4))
    await member.step()
    assert [(p.delivered.partition, p.delivered.offset, p.reason, p.sqlstate) for p in
            member.dead_letters.sent] == [(0, 2, "database_refused", "22023")]  # fmt: skip
    assert [e for e, _ in fleet.applied(0)] == ids(0, range(1, 3)) + ids(0, range(4, 6))
    assert [e for e, _ in fleet.applied(1)] == ids(1, range(1, 4))
    assert fleet.stored() == {0: (5, "contract-a"), 1: (3, "contract-a")}


# Two statements fail with serialization_failure (40001), then the database is fine:
# a sequence counts across the rolled-back attempts, a table row would not.
FAIL_TWICE = """
CREATE SEQUENCE failures;
CREATE FUNCTION fail_twice() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF nextval('failures') <= 2 THEN
        RAISE EXCEPTION 'could not serialize access' USING ERRCODE = '40001';
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER fail_twice BEFORE INSERT ON event_records
    FOR EACH STATEMENT EXECUTE FUNCTION fail_twice();
"""


async def test_a_transient_database_failure_is_retried_and_dead_letters_nothing(
    fleet: Fleet,
) -> None:
    fleet.sql(FAIL_TWICE)
    member = await fleet.member("contract-a")
    await fleet.heartbeats(0, range(1, 4))
    await fleet.heartbeats(1, range(1, 3))
    await member.step()
    assert member.counted(RETRIES) == 2
    assert member.dead_letters.sent == []
    assert [e for e, _ in fleet.applied(0)] == ids(0, range(1, 4))
    assert [e for e, _ in fleet.applied(1)] == ids(1, range(1, 3))
    assert fleet.stored() == {0: (3, "contract-a"), 1: (2, "contract-a")}


def once(action: Callable[[], None]) -> Callable[[list[PendingFence]], None]:
    done: list[bool] = []

    def before_fence(pending: list[PendingFence]) -> None:
        if not done:
            done.append(True)
            action()

    return before_fence


async def test_a_fence_lost_mid_batch_drops_that_partition_and_applies_the_others(
    fleet: Fleet,
) -> None:
    member = await fleet.member("contract-a")
    await fleet.heartbeats(0, range(1, 4))
    await fleet.heartbeats(1, range(1, 4))
    # Effects written, fences not yet checked: another member takes partition 1 over.
    member.applier.before_fence = once(lambda: fleet.take_over(1, "contract-b"))
    await member.step()
    assert member.counted(FENCED) == 1
    assert member.ownerships.get(1) is None
    assert fleet.applied(1) == []  # nothing of the fenced partition, not even part of it
    assert [e for e, _ in fleet.applied(0)] == ids(0, range(1, 4))
    assert fleet.stored() == {0: (3, "contract-a"), 1: (0, "contract-b")}


async def test_a_revoke_during_apply_leaves_the_records_to_the_next_owner_once(
    fleet: Fleet,
) -> None:
    a = await fleet.member("contract-a")
    await fleet.heartbeats(0, range(1, 4))
    await fleet.heartbeats(1, range(1, 4))

    def revoke() -> None:
        a.ownerships.release([1])  # the revoke callback, while the batch is in flight
        fleet.take_over(1, "contract-b")  # the partition's next owner claims it

    a.applier.before_fence = once(revoke)
    await a.step()
    b = await fleet.member("contract-b", [1])
    await fleet.heartbeats(1, range(4, 6))
    await b.step()
    await fleet.heartbeats(0, range(4, 5))
    await a.step()  # a still reads partition 1, and must not apply it
    assert [e for e, _ in fleet.applied(0)] == ids(0, range(1, 5))
    assert fleet.applied(1) == [(e, o) for o, e in enumerate(ids(1, range(1, 6)))]
    assert fleet.stored() == {0: (4, "contract-a"), 1: (5, "contract-b")}
    # Every effect in partition 1 is the new owner's: none of the revoked batch committed.
    claim = b.ownerships.get(1)
    assert claim is not None
    assert fleet.sql("SELECT DISTINCT epoch FROM event_records WHERE partition = 1") == [
        (claim.epoch,)
    ]
    assert a.dead_letters.sent == b.dead_letters.sent == []

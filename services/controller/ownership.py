"""Partition ownership: epochs and the fence.

Kafka's consumer group decides which controller owns a partition. On assignment
the controller takes a new epoch from one global, strictly increasing PostgreSQL
sequence and writes it to the partition's ownership row. Every apply transaction
ends by advancing the partition's stored offset *only if its epoch is still the
current one*; a controller whose partition has moved on (a paused or partitioned
"zombie") fails that check, and its whole transaction rolls back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import BigInteger, Integer, bindparam, column, func, select, update
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlalchemy.ext.asyncio import AsyncConnection

from services.shared.schema import epoch_sequence, partition_ownership


class FencedError(Exception):
    """This controller's epoch is no longer the partition's current one."""

    def __init__(self, topic: str, partition: int, epoch: int) -> None:
        super().__init__(f"epoch {epoch} of {topic}[{partition}] was superseded")
        self.topic = topic
        self.partition = partition
        self.epoch = epoch


@dataclass(frozen=True, slots=True)
class Claim:
    """What a controller holds for one partition after taking it over."""

    topic: str
    partition: int
    epoch: int
    next_offset: int
    """The offset of the next record to apply, as stored with the last effects."""


async def take_epoch(conn: AsyncConnection, topic: str, partition: int, owner: str) -> Claim:
    """Become the partition's owner with a fresh epoch.

    The new epoch is drawn from the global sequence, so it is larger than any epoch
    a previous owner holds. Runs in the caller's transaction; the caller commits.
    """
    new_epoch = epoch_sequence.next_value()
    statement = (
        insert(partition_ownership)
        .values(topic=topic, partition=partition, epoch=new_epoch, owner=owner, next_offset=0)
        .on_conflict_do_update(
            index_elements=["topic", "partition"],
            set_={"epoch": new_epoch, "owner": owner, "assigned_at": func.now()},
        )
        .returning(partition_ownership.c.epoch, partition_ownership.c.next_offset)
    )
    row = (await conn.execute(statement)).one()
    return Claim(topic, partition, int(row.epoch), int(row.next_offset))


async def advance_fenced(conn: AsyncConnection, claim: Claim, next_offset: int) -> None:
    """Store the partition's new offset if ``claim`` still holds the current epoch.

    Must be the last statement of the apply transaction: it takes the ownership
    row's lock only for the moment before commit. Raises FencedError (the caller
    rolls back) when another owner took a newer epoch.
    """
    result = await conn.execute(
        update(partition_ownership)
        .where(
            partition_ownership.c.topic == claim.topic,
            partition_ownership.c.partition == claim.partition,
            partition_ownership.c.epoch == claim.epoch,
        )
        .values(next_offset=next_offset, updated_at=func.now())
    )
    if result.rowcount != 1:
        raise FencedError(claim.topic, claim.partition, claim.epoch)


def _fence_statement() -> Any:
    wanted = (
        func.unnest(
            bindparam("fence_partitions", type_=ARRAY(Integer)),
            bindparam("fence_epochs", type_=ARRAY(BigInteger)),
            bindparam("fence_next_offsets", type_=ARRAY(BigInteger)),
        )
        .table_valued(
            column("partition", Integer),
            column("epoch", BigInteger),
            column("next_offset", BigInteger),
        )
        .render_derived(name="wanted")
    )
    owned = partition_ownership.c
    # ORDER BY with FOR UPDATE locks the rows in partition order (PostgreSQL sorts
    # before it locks), so two controllers fencing overlapping partitions never
    # wait on each other in opposite orders.
    locked = (
        select(owned.partition)
        .join_from(
            partition_ownership,
            wanted,
            (owned.partition == wanted.c.partition) & (owned.epoch == wanted.c.epoch),
        )
        .where(owned.topic == bindparam("fence_topic"))
        .order_by(owned.partition)
        .with_for_update(of=partition_ownership)
        .cte("locked")
    )
    return (
        update(partition_ownership)
        .values(next_offset=wanted.c.next_offset, updated_at=func.now())
        .where(
            owned.topic == bindparam("fence_topic"),
            owned.partition == wanted.c.partition,
            owned.epoch == wanted.c.epoch,
            owned.partition.in_(select(locked.c.partition)),
        )
        .returning(owned.partition)
    )


ADVANCE_FENCED: Final = _fence_statement()


def fence_parameters(advances: Sequence[tuple[Claim, int]]) -> dict[str, Any]:
    """The bound arrays of ``ADVANCE_FENCED`` for (claim, next offset) pairs of one topic."""
    topics = {claim.topic for claim, _ in advances}
    if len(topics) != 1:
        raise ValueError(f"one fence covers one topic, not {sorted(topics)}")
    ordered = sorted(advances, key=lambda a: a[0].partition)
    return {
        "fence_topic": topics.pop(),
        "fence_partitions": [claim.partition for claim, _ in ordered],
        "fence_epochs": [claim.epoch for claim, _ in ordered],
        "fence_next_offsets": [next_offset for _, next_offset in ordered],
    }


async def advance_all_fenced(conn: AsyncConnection, advances: Sequence[tuple[Claim, int]]) -> None:
    """Store every partition's new offset, if every claim still holds the current epoch.

    One statement for the whole batch: it locks the ownership rows in partition
    order, checks each epoch and moves each offset. Must be the last statement of
    the apply transaction (the rows stay locked until commit). Raises FencedError
    for the lowest partition whose epoch was superseded; the caller rolls back.
    """
    if not advances:
        return
    result = await conn.execute(ADVANCE_FENCED, fence_parameters(advances))
    advanced = {int(row.partition) for row in result}
    for claim, _ in sorted(advances, key=lambda a: a[0].partition):
        if claim.partition not in advanced:
            raise FencedError(claim.topic, claim.partition, claim.epoch)


async def current_epoch(conn: AsyncConnection, topic: str, partition: int) -> int | None:
    row = (
        await conn.execute(
            select(partition_ownership.c.epoch).where(
                partition_ownership.c.topic == topic,
                partition_ownership.c.partition == partition,
            )
        )
    ).one_or_none()
    return None if row is None else int(row.epoch)


async def check_fenced(conn: AsyncConnection, claim: Claim) -> None:
    """Raise FencedError unless ``claim`` still holds the current epoch.

    For transactions that change fleet state without consuming records (timers);
    the share lock holds a takeover back until this transaction ends.
    """
    row = (
        await conn.execute(
            select(partition_ownership.c.epoch)
            .where(
                partition_ownership.c.topic == claim.topic,
                partition_ownership.c.partition == claim.partition,
                partition_ownership.c.epoch == claim.epoch,
            )
            .with_for_update(read=True)
        )
    ).one_or_none()
    if row is None:
        raise FencedError(claim.topic, claim.partition, claim.epoch)

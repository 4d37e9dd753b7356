"""Partition ownership: epochs and the fence.

Kafka's consumer group decides which controller owns a partition. On assignment
the controller takes a new epoch from one global, strictly increasing PostgreSQL
sequence and writes it to the partition's ownership row. Every apply transaction
ends by advancing the partition's stored offset *only if its epoch is still the
current one*; a controller whose partition has moved on (a paused or partitioned
"zombie") fails that check, and its whole transaction rolls back.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
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

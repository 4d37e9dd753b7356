"""The accept benchmark's fleet: every partition gets agents, and the load generator's
templates make batches the API accepts."""

from __future__ import annotations

from collections import Counter

from aiokafka.partitioner import DefaultPartitioner

from bench.accept import event_templates, fleet_customers
from bench.edge import batch20_body, single_body
from services.api.service import parse_batch


def test_the_fleets_customers_land_on_every_partition_in_turn() -> None:
    customers = fleet_customers(200, 12)
    assert len(set(customers)) == 200
    every = list(range(12))
    partitions = [DefaultPartitioner()(c.encode(), every, every) for c in customers]
    assert partitions == [i % 12 for i in range(200)]
    assert min(Counter(partitions).values()) >= 200 // 12


def test_templates_become_valid_batches_with_the_ids_and_sequences_filled_in() -> None:
    for body, count in ((single_body(), 1), (batch20_body(), 20)):
        templates = event_templates(body)
        assert len(templates) == count
        events = [
            t.replace("@ID@", f"run-7-{seq}").replace("@SEQ@", str(seq))
            for seq, t in enumerate(templates, start=1)
        ]
        batch = parse_batch(('{"events":[' + ",".join(events) + "]}").encode())
        assert [(e.id, e.seq) for e in batch.events] == [
            (f"run-7-{seq}", seq) for seq in range(1, count + 1)
        ]

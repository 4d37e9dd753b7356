"""Which apply failures are poison and which are back-pressure, and the seek guard.

The errors are psycopg's own classes, looked up by SQLSTATE the way psycopg maps a
server's answer, wrapped as SQLAlchemy wraps them in the controller.
"""

from __future__ import annotations

import psycopg
import pytest
from aiokafka.errors import IllegalStateError
from psycopg import errors
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from services.controller.applier import GuardedSeek
from services.controller.failures import classify, describe, sqlstate_of


def from_server(sqlstate: str, message: str = "refused") -> DBAPIError:
    """What SQLAlchemy raises when PostgreSQL answers with ``sqlstate``."""
    error_class = errors.lookup(sqlstate)
    original = error_class(message)
    # psycopg fills sqlstate from the server's diagnostics; its classes carry it too.
    assert original.sqlstate == sqlstate
    return DBAPIError("INSERT ...", None, original)


@pytest.mark.parametrize(
    ("sqlstate", "what"),
    [
        ("22001", "string_data_right_truncation"),
        ("22003", "numeric_value_out_of_range"),
        ("22007", "invalid_datetime_format"),
        ("22008", "datetime_field_overflow"),
        ("22021", "character_not_in_repertoire"),
        ("22P02", "invalid_text_representation (e.g. NaN in jsonb)"),
        ("22P05", "untranslatable_character (\\u0000 in jsonb)"),
        ("23502", "not_null_violation"),
        ("23505", "unique_violation"),
        ("23514", "check_violation"),
        ("54000", "program_limit_exceeded (index row too large)"),
        ("54001", "statement_too_complex"),
    ],
)
def test_what_the_values_cause_is_poison(sqlstate: str, what: str) -> None:
    error = from_server(sqlstate)
    assert classify(error) == "poison", what
    assert sqlstate_of(error) == sqlstate


@pytest.mark.parametrize(
    ("sqlstate", "what"),
    [
        ("08006", "connection_failure"),
        ("25006", "read_only_sql_transaction (a standby after failover)"),
        ("40001", "serialization_failure"),
        ("40P01", "deadlock_detected"),
        ("53100", "disk_full"),
        ("53300", "too_many_connections"),
        ("57014", "query_canceled (statement timeout)"),
        ("57P01", "admin_shutdown"),
        ("57P03", "cannot_connect_now (starting up)"),
        ("42P01", "undefined_table (a migration not run yet)"),
        ("55P03", "lock_not_available"),
    ],
)
def test_what_the_server_causes_is_back_pressure(sqlstate: str, what: str) -> None:
    assert classify(from_server(sqlstate)) == "back_pressure", what


def test_client_side_refusals_count_by_what_they_say() -> None:
    # psycopg refuses a NUL in text before sending anything: no SQLSTATE, a DataError.
    nul = DBAPIError("INSERT ...", None, psycopg.DataError("NUL (0x00) bytes"))
    assert sqlstate_of(nul) is None
    assert classify(nul) == "poison"
    # A connection that dropped: an OperationalError without a SQLSTATE.
    dropped = DBAPIError("INSERT ...", None, psycopg.OperationalError("server closed"))
    assert classify(dropped) == "back_pressure"
    assert classify(ConnectionRefusedError()) == "back_pressure"
    assert classify(PoolTimeout("QueuePool limit reached")) == "back_pressure"
    # A string Python cannot encode as UTF-8 (a lone surrogate), and anything else
    # that planning one batch raises, come from that batch's records.
    assert classify(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates")) == "poison"
    assert classify(KeyError("payload")) == "poison"


def test_the_dead_letter_detail_is_the_databases_message_without_the_statement() -> None:
    error = from_server("22P05", "unsupported Unicode escape sequence\nDETAIL: \\u0000")
    assert describe(error) == "UntranslatableCharacter: unsupported Unicode escape sequence"


class Seeks:
    def __init__(self, raising: Exception | None = None) -> None:
        self.done: list[tuple[int, int]] = []
        self.raising = raising

    async def __call__(self, partition: int, offset: int) -> None:
        if self.raising is not None:
            raise self.raising
        self.done.append((partition, offset))


async def test_a_seek_of_a_partition_no_longer_assigned_is_skipped() -> None:
    seeks = Seeks()
    guarded = GuardedSeek(seeks, assigned=lambda p: p == 1)
    await guarded(1, 40)
    await guarded(2, 70)  # taken away by a rebalance: the new owner starts at the stored offset
    assert seeks.done == [(1, 40)]


async def test_a_partition_unassigned_while_seeking_does_not_crash_the_apply_loop() -> None:
    raising = Seeks(IllegalStateError("No current assignment for partition TopicPartition"))
    await GuardedSeek(raising, assigned=lambda p: True)(3, 10)
    assert raising.done == []
    # Anything else still surfaces.
    broken = GuardedSeek(Seeks(RuntimeError("consumer stopped")), assigned=lambda p: True)
    with pytest.raises(RuntimeError):
        await broken(3, 10)

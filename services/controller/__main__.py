"""``python -m services.controller [run|status|dead-letters]``.

- ``run`` (the default when no command is named, so ``python -m services.controller
  --web-port N`` keeps working): one controller of the consumer group;
- ``status``: who owns each partition, its lag, customers and events/s;
- ``dead-letters inspect|replay``: read poison records back, replay them after a fix.

Settings come from ``FLEETPLANE_*`` environment variables for every command, so the
tools look at the same topics and database as the controllers they sit beside.
Each verb is thin; the logic is in ``ops.py``, ``dead_letters.py`` and ``app.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.controller.settings import ControllerSettings

if TYPE_CHECKING:
    from services.controller.applier import Applier

logger = logging.getLogger("services.controller")

COMMANDS = ("run", "status", "dead-letters")


def main(
    argv: list[str] | None = None, *, customize: Callable[[Applier], None] | None = None
) -> int:
    """Run a command; ``customize`` is given the running controller's ``Applier`` (``run``
    only) before it starts, for observers such as the chaos tests' zombie hook."""
    args = _parser().parse_args(_with_default_command(sys.argv[1:] if argv is None else argv))
    args.customize = customize
    handler: Any = args.handler
    return int(handler(args))


def _with_default_command(argv: list[str]) -> list[str]:
    """Name ``run`` when no command is: scripts start controllers with bare options."""
    if argv and (argv[0] in COMMANDS or argv[0] in ("-h", "--help")):
        return argv
    return ["run", *argv]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.controller",
        description="Apply agent events from Kafka to PostgreSQL, one fenced owner per "
        "partition, and inspect the group. Settings come from FLEETPLANE_* environment "
        "variables (docs/controller-ops.md). Without a command, runs a controller.",
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run one controller of the consumer group (default)")
    run.add_argument("--web-port", type=int, help="port for /healthz, /readyz, /status, /metrics")
    run.add_argument("--instance-id", help="name of this controller in the ownership table")
    run.add_argument("--loglevel", default="info")
    run.set_defaults(handler=_run)

    status = commands.add_parser(
        "status", help="per partition: owner, epoch, stored and log-end offsets, lag, load"
    )
    status.add_argument("--customer", help="also show this customer's partition and owner")
    status.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    status.add_argument("--json", action="store_true", help="one JSON object per report")
    status.add_argument(
        "--rate-window",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="events/s counts the events applied in this many seconds (default 10)",
    )
    status.set_defaults(handler=_status)

    letters = commands.add_parser("dead-letters", help="inspect or replay dead-lettered records")
    verbs = letters.add_subparsers(title="actions", required=True, metavar="ACTION")
    inspect = verbs.add_parser("inspect", help="list dead letters: reason, source, value preview")
    inspect.add_argument(
        "--limit", type=int, default=20, metavar="N", help="the newest N per partition"
    )
    inspect.add_argument("--json", action="store_true", help="one JSON object per dead letter")
    inspect.set_defaults(handler=_inspect)

    replay = verbs.add_parser(
        "replay", help="produce dead letters back to their source topic, original key"
    )
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every dead letter the topic holds")
    which.add_argument(
        "--offset",
        action="append",
        metavar="[PARTITION:]OFFSET",
        help="one dead letter by its offset in the dead-letter topic (repeatable)",
    )
    replay.add_argument(
        "--only-valid",
        action="store_true",
        help="skip records the controller would dead-letter again",
    )
    replay.add_argument(
        "--value-file",
        type=Path,
        help="replay this corrected value instead of the original bytes (one --offset only)",
    )
    replay.add_argument("--dry-run", action="store_true", help="say what would be replayed")
    replay.add_argument("--json", action="store_true", help="one JSON object per dead letter")
    replay.set_defaults(handler=_replay)
    return parser


# --- run ---------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    # faust is imported here, not at the top: the tools need none of it.
    import faust

    from services.controller.app import create_app
    from services.shared.readiness import DependencyUnavailableError

    overrides = {}
    if args.web_port is not None:
        overrides["web_port"] = args.web_port
    if args.instance_id:
        overrides["instance_id"] = args.instance_id
    settings = ControllerSettings(**overrides)

    logging.basicConfig(
        level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        problem = asyncio.run(_check_dependencies(settings))
    except DependencyUnavailableError as e:
        problem = str(e)
    if problem:
        logger.error("cannot start: %s", problem)
        return 2

    if settings.event_loop == "uvloop":
        import uvloop

        # Before the app and its worker exist: both take the loop the policy makes.
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    app = create_app(settings)
    if args.customize is not None:
        args.customize(app.partitions.applier)
    worker = faust.Worker(app, loglevel=args.loglevel, quiet=True)
    # The worker stops the app (leaving the consumer group) on SIGTERM and SIGINT.
    worker.execute_from_commandline()
    return 0


async def _check_dependencies(settings: ControllerSettings) -> str | None:
    """Wait for PostgreSQL and Kafka; return why the controller must not start, if so."""
    from services.shared.readiness import wait_for_kafka, wait_for_postgres

    await wait_for_postgres(settings.database.libpq_dsn, settings.startup_timeout_s)
    await wait_for_kafka(
        settings.kafka.kafka_bootstrap,
        settings.startup_timeout_s,
        topics=(settings.kafka.events_topic, settings.kafka.dead_letter_topic),
    )
    return await _retention_problem(settings)


async def _retention_problem(settings: ControllerSettings) -> str | None:
    """Why the record retention window is unsafe for the events topic, if it is."""
    from services.controller.retention import retention_problem, topic_retention_ms

    topic = settings.kafka.events_topic
    try:
        kafka_ms = await topic_retention_ms(settings.kafka.kafka_bootstrap, topic)
    except (LookupError, OSError, TimeoutError) as e:
        # The topic exists (checked above); a broker that will not describe it should
        # not keep the controller down, but the operator should know.
        logger.warning("could not read retention.ms of %s (%s); not checked", topic, e)
        return None
    if kafka_ms is None:
        logger.warning(
            "%s keeps records forever; event records are pruned after %.0f s, so an offset "
            "reset to older records would apply them again",
            topic,
            settings.record_retention_s,
        )
    return retention_problem(settings.record_retention_s, kafka_ms)


# --- status ------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    settings = ControllerSettings()
    try:
        return asyncio.run(_status_loop(settings, args))
    except KeyboardInterrupt:
        return 0


async def _status_loop(settings: ControllerSettings, args: argparse.Namespace) -> int:
    from services.controller.ops import StatusReader, render
    from services.shared.db import create_engine

    engine = create_engine(settings.database, application_name="controller status")
    status = StatusReader(engine, settings.kafka)
    try:
        while True:
            try:
                report = await status.read(args.customer, args.rate_window)
            except Exception as e:
                print(f"cannot read status: {e.__class__.__name__}: {e}", file=sys.stderr)
                if args.watch is None:
                    return 2
            else:
                if args.json:
                    print(json.dumps(report.to_json()), flush=True)
                else:
                    # Clear the terminal between refreshes, like watch(1).
                    clear = args.watch is not None and sys.stdout.isatty()
                    print(("\x1b[H\x1b[2J" if clear else "") + render(report), flush=True)
            if args.watch is None:
                return 0
            await asyncio.sleep(args.watch)
    finally:
        await engine.dispose()


# --- dead-letters --------------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> int:
    from services.controller.dead_letters import read_dead_letters

    kafka = ControllerSettings().kafka
    try:
        letters = asyncio.run(
            read_dead_letters(kafka.kafka_bootstrap, kafka.dead_letter_topic, last=args.limit)
        )
    except (LookupError, OSError, TimeoutError) as e:
        print(f"cannot read {kafka.dead_letter_topic}: {e}", file=sys.stderr)
        return 2
    for letter in letters:
        if args.json:
            print(json.dumps(letter.to_json()))
            continue
        print(
            f"{letter.partition}:{letter.offset}  {letter.reason}"
            f"{f' (SQLSTATE {letter.sqlstate})' if letter.sqlstate else ''}  from "
            f"{letter.source_topic}[{letter.source_partition}]@{letter.source_offset}  "
            f"key={letter.key!r}\n    detail: {letter.detail}\n    value:  {letter.preview()}"
        )
    if not args.json:
        print(f"{len(letters)} dead letter(s) shown from {kafka.dead_letter_topic}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from services.controller.dead_letters import parse_letter_id, read_dead_letters, replay

    kafka = ControllerSettings().kafka
    try:
        wanted = None if args.all else [parse_letter_id(o) for o in args.offset]
    except ValueError as e:
        print(f"replay: {e}", file=sys.stderr)
        return 2
    if args.value_file is not None and (wanted is None or len(wanted) != 1):
        print("replay: --value-file replaces the value of exactly one --offset", file=sys.stderr)
        return 2
    replacement = args.value_file.read_bytes() if args.value_file is not None else None
    try:
        letters = asyncio.run(
            read_dead_letters(kafka.kafka_bootstrap, kafka.dead_letter_topic, only=wanted)
        )
        outcomes = asyncio.run(
            replay(
                kafka.kafka_bootstrap,
                letters,
                fallback_topic=kafka.events_topic,
                only_valid=args.only_valid,
                replacement=replacement,
                dry_run=args.dry_run,
            )
        )
    except (LookupError, OSError, TimeoutError) as e:
        print(f"replay: {e}", file=sys.stderr)
        return 2
    for o in outcomes:
        where = "" if o.target is None else f" -> {o.target[0]}[{o.target[1]}]@{o.target[2]}"
        if args.json:
            print(
                json.dumps(
                    {
                        "partition": o.letter.partition,
                        "offset": o.letter.offset,
                        "action": o.action,
                        "why": o.why,
                        "target": None if o.target is None else list(o.target),
                    }
                )
            )
        else:
            print(f"{o.letter.partition}:{o.letter.offset}  {o.action} ({o.why}){where}")
    missing = sorted(set(wanted or ()) - {(o.letter.partition, o.letter.offset) for o in outcomes})
    for partition, offset in missing:
        print(f"{partition}:{offset}  not found in {kafka.dead_letter_topic}", file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())

"""The one-screen live summary, the plain progress line and the final report text."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Final

CLEAR: Final = "\x1b[H\x1b[2J"
RECENT_LOG_LINES: Final = 6


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _num(value: Any, unit: str = "/s") -> str:
    return "-" if value is None else f"{value:.1f}{unit}"


def render(snapshot: dict[str, Any], title: str) -> list[str]:
    """The summary as lines of text, from ``Stats.snapshot`` output."""
    ev, ap, cm = snapshot["events"], snapshot["applied"], snapshot["commands"]
    post, lag = ev["post_latency_ms"], ap["accept_to_applied_ms"]
    errors = snapshot["errors"]
    lines = [
        f"{title}   t={snapshot['elapsed_s']:.0f}s   agents running {snapshot['agents_running']}",
        "",
        f"events    accepted {ev['accepted']} in {ev['batches_accepted']} batches   "
        f"now {_num(ev['accepted_per_s_now'])}   avg {_num(ev['accepted_per_s_avg'])}",
        f"          retries {ev['retries']}   abandoned batches {ev['abandoned_batches']}   "
        f"refused events {ev['refused_events']}",
        f"applied   ({ap['source']})   now {_num(ap['per_s_now'])}   avg {_num(ap['per_s_avg'])}   "
        f"samples {ap['samples_tracked']}: applied {ap['samples_applied']} "
        f"rejected {ap['samples_rejected']} timed out {ap['samples_timed_out']}",
        f"latency   POST p50 {_ms(post['p50'])} p99 {_ms(post['p99'])}   "
        f"accept->applied p50 {_ms(lag['p50'])} p99 {_ms(lag['p99'])}",
        f"commands  delivered {cm['delivered']}   applied {cm['applied']}   "
        f"failed {cm['failed']}   "
        f"stale-epoch ignored {cm['stale_epoch_ignored']}   "
        f"duplicate ignored {cm['duplicate_ignored']}   newest epoch {cm['newest_epoch']}   "
        f"poll retries {cm['poll_retries']}",
        "errors    "
        + ("none" if not errors else "   ".join(f"{k}={v}" for k, v in errors.items())),
    ]
    return lines + ownership_lines(snapshot.get("ownership"))


def ownership_lines(ownership: dict[str, Any] | None) -> list[str]:
    """Which controller owns which partition (from /status), one line per owner."""
    if ownership is None:
        return []
    lines = ["", f"ownership (controllers' /status)   total lag {ownership['total_lag']}"]
    for owner, held in ownership["owners"].items():
        partitions = ",".join(str(p) for p in held["partitions"])
        lines.append(
            f"  {owner:<28} partitions {partitions:<20} lag {held['lag']:<6} "
            f"{_num(held['events_per_s'], ' ev/s')}"
        )
    if ownership["unowned"]:
        lines.append(f"  unowned partitions {','.join(map(str, ownership['unowned']))}")
    return lines


def progress_line(snapshot: dict[str, Any]) -> str:
    """A one-line summary for ``--no-live`` logs."""
    ev, ap, cm = snapshot["events"], snapshot["applied"], snapshot["commands"]
    errors = sum(snapshot["errors"].values())
    return (
        f"t={snapshot['elapsed_s']:.0f}s agents={snapshot['agents_running']} "
        f"accepted={ev['accepted']} ({_num(ev['accepted_per_s_now'])}) "
        f"applied={_num(ap['per_s_now'])} [{ap['source']}] "
        f"post_p99={_ms(ev['post_latency_ms']['p99'])} "
        f"apply_p99={_ms(ap['accept_to_applied_ms']['p99'])} "
        f"commands={cm['delivered']}/{cm['applied']}/{cm['stale_epoch_ignored']} "
        f"retries={ev['retries']} errors={errors}" + _ownership_brief(snapshot.get("ownership"))
    )


def _ownership_brief(ownership: dict[str, Any] | None) -> str:
    if ownership is None:
        return ""
    return f" owners={len(ownership['owners'])} lag={ownership['total_lag']}"


class RecentLog(logging.Handler):
    """Keeps the last few log lines for the live screen, which would overwrite them."""

    def __init__(self, size: int = RECENT_LOG_LINES) -> None:
        super().__init__(logging.WARNING)
        self.lines: deque[str] = deque(maxlen=size)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record)[:200])

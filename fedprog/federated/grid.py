"""The server's view of the federation: Flower's ``Grid``, with replies pulled at a configurable interval.

Flower 1.42's ``send_and_receive`` sleeps a fixed interval between two pulls for replies: 0.1 s in the
simulation engine and 3 s against a SuperLink. Every wait for a round's replies, a query or an evaluation
therefore ends up to that long after the last reply arrived. :class:`PollingGrid` wraps the grid Flower hands
the ServerApp and waits with ``reply_poll_s`` instead (``python simulations/flower_floor.py --poll-ms``
measures the difference); everything else is the wrapped grid's. A long wait (a deployed round takes minutes)
is polled more slowly as it goes on, so the server never asks more often than every ``LATENESS`` of the time
waited so far, capped at ``reply_poll_max_s``: a reply is collected at most that late, and a ten-minute round
costs hundreds of pulls, not tens of thousands.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid
from flwr.supercore.run import Run

#: The pull interval grows to this share of the time waited so far (within ``interval`` .. ``max_interval``).
LATENESS = 0.02


class PollingGrid(Grid):
    """``grid`` whose :meth:`send_and_receive` pulls replies every ``interval`` seconds, or every ``LATENESS``
    of the time waited so far when that is longer, at most every ``max_interval`` seconds."""

    def __init__(self, grid: Grid, interval: float, max_interval: float) -> None:  # noqa: D107 - above
        if not interval > 0:
            raise ValueError(f"reply_poll_s={interval}: choose a positive number of seconds")
        if not max_interval >= interval:
            raise ValueError(f"reply_poll_max_s={max_interval}: choose at least reply_poll_s={interval}")
        self.grid = grid
        self.interval = float(interval)
        self.max_interval = float(max_interval)

    def set_run(self, run: Run) -> None:  # noqa: D102 - Grid's
        self.grid.set_run(run)

    @property
    def run(self) -> Run:  # noqa: D102 - Grid's
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:  # noqa: D102 - Grid's (deprecated there)
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102 - Grid's
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:  # noqa: D102 - Grid's
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102 - Grid's
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102 - Grid's
        return self.grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages``, then pull their replies every ``interval`` seconds until all have arrived or
        ``timeout`` seconds have passed (None: no limit), as Flower's own method does."""
        waiting = set(self.push_messages(messages))
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        replies: list[Message] = []
        while waiting:
            for reply in self.pull_messages(waiting):
                replies.append(reply)
                waiting.discard(reply.metadata.reply_to_message_id)
            if not waiting:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            now = time.monotonic()
            interval = min(max(self.interval, LATENESS * (now - started)), self.max_interval)
            time.sleep(interval if deadline is None else min(interval, max(deadline - now, 0.0)))
        return replies

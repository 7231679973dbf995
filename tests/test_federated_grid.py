"""The server's grid: replies pulled at ``reply_poll_s`` instead of Flower's fixed 0.1 s / 3 s sleeps."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

from fedprog.config import load_config
from fedprog.federated import grid as grid_module
from fedprog.federated.errors import SettingsError
from fedprog.federated.grid import PollingGrid
from fedprog.federated.settings import check_run_settings


def _reply(message_id: str) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=message_id))


class ScheduledGrid:
    """Replies become available on given pulls: ``schedule[k]`` lists the message ids answered on pull k."""

    def __init__(self, schedule: list[list[str]]) -> None:
        self.schedule = schedule
        self.pulls: list[set[str]] = []
        self.pushed: list[str] = []

    def push_messages(self, messages):
        self.pushed = [m.id for m in messages]
        return list(self.pushed)

    def pull_messages(self, message_ids):
        asked = set(message_ids)
        self.pulls.append(asked)
        due = self.schedule[len(self.pulls) - 1] if len(self.pulls) <= len(self.schedule) else []
        return [_reply(i) for i in due if i in asked]

    def get_node_ids(self):
        return [7, 8]


def _messages(*ids: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(id=i) for i in ids]


def test_replies_are_pulled_every_interval_until_all_have_arrived(monkeypatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(grid_module.time, "sleep", sleeps.append)
    inner = ScheduledGrid([[], ["b"], [], ["a", "c"]])
    replies = PollingGrid(inner, 0.02, 1.0).send_and_receive(_messages("a", "b", "c"))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b", "c"]
    assert len(inner.pulls) == 4 and sleeps == [0.02] * 3  # no sleep after the last reply
    assert inner.pulls[2] == {"a", "c"}  # a reply already in is not asked for again


def test_a_long_wait_is_polled_less_often_up_to_the_cap(monkeypatch) -> None:
    clock = {"now": 0.0}
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock["now"] += seconds

    monkeypatch.setattr(grid_module.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(grid_module.time, "sleep", sleep)
    inner = ScheduledGrid([[]] * 400 + [["a"]])
    PollingGrid(inner, 0.02, 1.0).send_and_receive(_messages("a"))
    assert sleeps[0] == 0.02 and max(sleeps) == 1.0  # from reply_poll_s up to reply_poll_max_s
    for waited, interval in zip(np.cumsum([0.0, *sleeps[:-1]]), sleeps, strict=True):
        assert interval == pytest.approx(min(max(0.02, grid_module.LATENESS * waited), 1.0))
    assert clock["now"] > 200  # over three minutes of waiting ...
    assert len(inner.pulls) < clock["now"] / 0.02 / 20  # ... in under a twentieth of the pulls at 0.02 s


def test_a_timeout_returns_the_replies_that_arrived(monkeypatch) -> None:
    inner = ScheduledGrid([["a"]])  # "b" never answers
    started = time.monotonic()
    replies = PollingGrid(inner, 0.01, 1.0).send_and_receive(_messages("a", "b"), timeout=0.05)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert 0.05 <= time.monotonic() - started < 1.0


def test_everything_else_is_the_wrapped_grid() -> None:
    inner = ScheduledGrid([])
    wrapped = PollingGrid(inner, 0.5, 1.0)
    assert wrapped.get_node_ids() == [7, 8]
    assert wrapped.push_messages(_messages("x")) == ["x"] and inner.pushed == ["x"]
    with pytest.raises(ValueError, match=r"reply_poll_s=0: choose a positive number of seconds"):
        PollingGrid(inner, 0, 1.0)
    with pytest.raises(ValueError, match=r"reply_poll_max_s=0.1: choose at least reply_poll_s=0.5"):
        PollingGrid(inner, 0.5, 0.1)


def test_a_bad_reply_poll_s_is_refused_before_start_up() -> None:
    with pytest.raises(SettingsError, match=r"reply_poll_s=-1.0: choose a positive number of seconds"):
        check_run_settings(load_config("simulate", ["reply_poll_s=-1.0"]))
    with pytest.raises(SettingsError, match=r"reply_poll_max_s=0.01: choose at least reply_poll_s=0.02"):
        check_run_settings(load_config("simulate", ["reply_poll_max_s=0.01"]))
    check_run_settings(load_config("simulate", ["reply_poll_s=null"]))  # Flower's own wait

"""Test helpers for the federated tests: an in-process Grid that calls the ClientApp handlers directly."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedprog.config import load_config
from fedprog.federated import client_app

TaskIdentity.run_id = 1
TaskIdentity.task_id = 1
TaskIdentity.node_id = 0

HANDLERS = client_app.HANDLERS  # guarded: a handler's exception becomes a sanitized error reply, as in Flower

Fault = Callable[[Message, Message], Message]


class DirectGrid:
    """A Grid whose nodes are partitions 0..n-1 answered by the ClientApp handlers in this process.

    ``faults[partition]`` may replace a node's reply (to inject errors or corrupt updates); every message sent
    is recorded in ``sent`` as (message type, partition).
    """

    def __init__(self, n_nodes: int, faults: dict[int, Fault] | None = None) -> None:
        self.node_ids = [1000 + i for i in range(n_nodes)]
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": i, "num-partitions": n_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i, node in enumerate(self.node_ids)
        }
        self.faults = faults or {}
        self.sent: list[tuple[str, int]] = []
        self.pending: dict[str, Message] = {}  # message id -> its reply, until pulled

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Answer each message at once; its reply waits for :meth:`pull_messages` under the message's id."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # as Flower's InMemoryGrid does
            self.pending[msg.metadata.message_id] = self.answer(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.pending.pop(i) for i in list(message_ids) if i in self.pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    def answer(self, msg: Message) -> Message:
        """The ClientApp handler's reply to ``msg`` (an error reply when it raises; ``faults`` applied)."""
        node = msg.metadata.dst_node_id
        partition = self.node_ids.index(node)
        kind = msg.metadata.message_type.split(".")[0]
        self.sent.append((kind, partition))
        try:
            reply = HANDLERS[kind](msg, self.contexts[node])
        except Exception as error:  # noqa: BLE001 - Flower turns handler exceptions into error replies
            reply = Message(Error(code=1, reason=f"{type(error).__name__}: {error}"), reply_to=msg)
        if partition in self.faults and kind == "train":
            reply = self.faults[partition](msg, reply)
        return reply


TINY_DATA = (  # generated data of two cancers, two hospitals each (also for `fedprog train`)
    "data.synth.cancers=[c0,c1]",
    "data.synth.n_patients=[40,30]",
    "data.synth.site_fractions=[0.5,0.5]",
    "data.synth.patches=[8,16]",
    "data.synth.n_genes=40",
    "data.synth.n_pathways=4",
    "data.synth.feature_dim=8",
    "data.synth.survival.weibull_scale=[60.0,40.0]",
    "data.synth.survival.weibull_shape=[1.2,1.0]",
    "data.synth.survival.censoring=[0.4,0.5]",
)


def tiny_config(data_root: Path, out: Path, *overrides: str, heldout: str | None = "[c1-B1]"):
    """The simulate config with a tiny model and data, 3 sites (2 train + 1 held out), 2 rounds.

    ``heldout=None`` leaves the config's default (a rotation sets it per fold)."""
    return load_config(
        "simulate",
        [
            f"data.root={data_root}",
            f"out={out}",
            *TINY_DATA,
            *([f"heldout={heldout}"] if heldout is not None else []),
            "rounds=2",
            "model.dim=16",
            "model.attn_dim=8",
            "model.head_hidden=8",
            "training.grad_accum=8",
            "node_wait_timeout=5",
            *overrides,
        ],
    )

"""The pending-call map: every call leaves once, by reply, deadline, close or drain."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from portao.routing import pending
from portao.routing.pending import PendingCall, PendingCalls


def _ids(calls: list[PendingCall]) -> list[str]:
    return [call.message_id for call in calls]


def test_a_reply_takes_its_call_once() -> None:
    calls = PendingCalls()
    added = calls.add("m1", conn=7, client_id=1, deadline=10.0)
    assert len(calls) == 1
    assert calls.pop("m1", 7) is added
    assert added == PendingCall("m1", 7, 1, 10.0)
    assert calls.pop("m1", 7) is None
    assert calls.late_or_unknown == 1
    assert len(calls) == 0
    assert calls.next_deadline() is None


def test_unknown_replies_are_counted() -> None:
    calls = PendingCalls()
    assert calls.pop("never-sent", 1) is None
    assert calls.late_or_unknown == 1


def test_a_reply_for_another_connection_is_not_delivered() -> None:
    """A reused slot never gets the answer meant for the connection before it."""
    calls = PendingCalls()
    calls.add("m1", conn=1, client_id="a", deadline=10.0)
    assert calls.pop("m1", 2) is None
    assert calls.late_or_unknown == 1
    assert len(calls) == 1
    popped = calls.pop("m1", 1)
    assert popped is not None
    assert popped.client_id == "a"


def test_client_ids_are_per_connection() -> None:
    calls = PendingCalls()
    calls.add("m1", conn=1, client_id=5, deadline=10.0)
    assert calls.has_client_id(1, 5)
    assert not calls.has_client_id(1, "5")
    assert not calls.has_client_id(2, 5)
    with pytest.raises(ValueError, match="already pending"):
        calls.add("m2", conn=1, client_id=5, deadline=10.0)
    calls.add("m3", conn=2, client_id=5, deadline=10.0)
    assert (calls.count(1), calls.count(2), calls.count(3)) == (1, 1, 0)
    calls.pop("m1", 1)
    assert not calls.has_client_id(1, 5)
    calls.add("m4", conn=1, client_id=5, deadline=10.0)


def test_a_message_id_is_tracked_once() -> None:
    calls = PendingCalls()
    calls.add("m1", conn=1, client_id=1, deadline=10.0)
    with pytest.raises(ValueError, match="already pending"):
        calls.add("m1", conn=2, client_id=1, deadline=10.0)
    assert calls.count(2) == 0
    assert len(calls) == 1


def test_expire_takes_due_calls_earliest_first() -> None:
    calls = PendingCalls()
    calls.add("late", conn=1, client_id=1, deadline=30.0)
    calls.add("b", conn=1, client_id=2, deadline=20.0)
    calls.add("a", conn=2, client_id=1, deadline=10.0)
    calls.add("answered", conn=2, client_id=2, deadline=5.0)
    calls.pop("answered", 2)
    assert calls.next_deadline() == 10.0
    assert calls.expire(9.99) == []
    assert _ids(calls.expire(20.0)) == ["a", "b"]
    assert calls.next_deadline() == 30.0
    assert calls.pop("a", 2) is None
    assert calls.late_or_unknown == 1
    assert _ids(calls.expire(100.0)) == ["late"]
    assert calls.next_deadline() is None
    assert len(calls) == 0


def test_closing_a_connection_takes_its_calls() -> None:
    calls = PendingCalls()
    calls.add("m1", conn=1, client_id=1, deadline=10.0)
    calls.add("m2", conn=2, client_id=1, deadline=5.0)
    calls.add("m3", conn=1, client_id=2, deadline=1.0)
    assert sorted(_ids(calls.drop_connection(1))) == ["m1", "m3"]
    assert calls.drop_connection(1) == []
    assert calls.count(1) == 0
    assert calls.next_deadline() == 5.0
    assert calls.pop("m3", 1) is None
    assert _ids(calls.expire(100.0)) == ["m2"]


def test_drain_takes_everything() -> None:
    calls = PendingCalls()
    calls.add("m1", conn=1, client_id=1, deadline=10.0)
    calls.add("m2", conn=2, client_id=1, deadline=5.0)
    assert sorted(_ids(calls.drain())) == ["m1", "m2"]
    assert len(calls) == 0
    assert calls.next_deadline() is None
    assert calls.expire(100.0) == []
    assert not calls.has_client_id(1, 1)


def test_the_heap_does_not_grow_with_answered_calls() -> None:
    calls = PendingCalls()
    calls.add("stays", conn=1, client_id="stays", deadline=1e12)
    for n in range(20_000):
        calls.add(f"m{n}", conn=2, client_id=n, deadline=float(n))
        assert calls.pop(f"m{n}", 2) is not None
        assert len(calls._heap) <= pending._COMPACT_RATIO * 1 + pending._COMPACT_FLOOR + 1
    assert calls.next_deadline() == 1e12


def test_calls_in_deadline_order_need_no_heap() -> None:
    """The gateway's case (one call timeout): the map's order is the deadline order."""
    calls = PendingCalls()
    for n in range(1000):
        calls.add(f"m{n}", conn=n % 7, client_id=n, deadline=100.0 + n // 10)
    for n in range(0, 1000, 3):
        calls.pop(f"m{n}", n % 7)
    assert calls._heap == []
    assert calls.next_deadline() == 100.0
    expired = calls.expire(149.0)
    assert _ids(expired) == [f"m{n}" for n in range(500) if n % 3]
    assert calls.next_deadline() == 150.0
    assert len(calls) == len([n for n in range(500, 1000) if n % 3])


def test_the_heap_does_not_grow_with_closed_connections() -> None:
    calls = PendingCalls()
    for conn in range(5_000):
        calls.add(f"a{conn}", conn=conn, client_id=1, deadline=float(conn))
        calls.add(f"b{conn}", conn=conn, client_id=2, deadline=float(conn))
        calls.drop_connection(conn)
        assert len(calls._heap) <= pending._COMPACT_FLOOR + 2


CONNS = st.sampled_from([1, 2, 3])
CLIENT_IDS = st.sampled_from([1, 2, "1", "a"])
TIMES = st.sampled_from([0.0, 1.0, 2.0, 2.5, 5.0])


class PendingModel(RuleBasedStateMachine):
    """The map against a plain dict of what should still wait."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = PendingCalls()
        self.model: dict[str, tuple[int, int | str, float]] = {}
        self.issued = 0
        self.late = 0

    def _pick_id(self, data: st.DataObject) -> str:
        """Any id issued so far, or one never issued."""
        return f"m{data.draw(st.integers(0, self.issued))}"

    @rule(conn=CONNS, client_id=CLIENT_IDS, deadline=TIMES)
    def add(self, conn: int, client_id: int | str, deadline: float) -> None:
        message_id = f"m{self.issued}"
        self.issued += 1
        if any((c, i) == (conn, client_id) for c, i, _ in self.model.values()):
            with pytest.raises(ValueError, match="already pending"):
                self.calls.add(message_id, conn, client_id, deadline)
            return
        call = self.calls.add(message_id, conn, client_id, deadline)
        assert call == PendingCall(message_id, conn, client_id, deadline)
        self.model[message_id] = (conn, client_id, deadline)

    @rule(data=st.data(), conn=CONNS)
    def pop_any(self, data: st.DataObject, conn: int) -> None:
        self._pop(self._pick_id(data), conn)

    @rule(data=st.data())
    def pop_right_connection(self, data: st.DataObject) -> None:
        message_id = self._pick_id(data)
        entry = self.model.get(message_id)
        self._pop(message_id, entry[0] if entry else 1)

    def _pop(self, message_id: str, conn: int) -> None:
        entry = self.model.get(message_id)
        popped = self.calls.pop(message_id, conn)
        if entry is not None and entry[0] == conn:
            del self.model[message_id]
            assert popped == PendingCall(message_id, *entry)
        else:
            self.late += 1
            assert popped is None

    @rule(now=TIMES)
    def expire(self, now: float) -> None:
        due = {m for m, (_, _, deadline) in self.model.items() if deadline <= now}
        expired = self.calls.expire(now)
        assert set(_ids(expired)) == due
        assert len(expired) == len(due)
        assert [c.deadline for c in expired] == sorted(c.deadline for c in expired)
        for message_id in due:
            del self.model[message_id]

    @rule(conn=CONNS)
    def drop_connection(self, conn: int) -> None:
        gone = {m for m, (c, _, _) in self.model.items() if c == conn}
        dropped = self.calls.drop_connection(conn)
        assert sorted(_ids(dropped)) == sorted(gone)
        for message_id in gone:
            del self.model[message_id]

    @rule()
    def drain(self) -> None:
        assert sorted(_ids(self.calls.drain())) == sorted(self.model)
        self.model.clear()

    @invariant()
    def agrees_with_the_model(self) -> None:
        assert len(self.calls) == len(self.model)
        assert self.calls.late_or_unknown == self.late
        deadlines = [deadline for _, _, deadline in self.model.values()]
        assert self.calls.next_deadline() == (min(deadlines) if deadlines else None)
        for conn in (1, 2, 3):
            mine = [i for c, i, _ in self.model.values() if c == conn]
            assert self.calls.count(conn) == len(mine)
            for client_id in (1, 2, "1", "a"):
                assert self.calls.has_client_id(conn, client_id) == (client_id in mine)

    @invariant()
    def heap_stays_bounded(self) -> None:
        live = len(self.model)
        assert len(self.calls._heap) <= pending._COMPACT_RATIO * live + pending._COMPACT_FLOOR


def test_pending_calls_agree_with_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # No floor: compaction runs at these small sizes too.
    monkeypatch.setattr(pending, "_COMPACT_FLOOR", 0)
    run_state_machine_as_test(
        PendingModel, settings=settings(max_examples=200, stateful_step_count=40, deadline=None)
    )

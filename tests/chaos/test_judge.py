"""The judge of the chaos suite finds what it is there to find (no processes)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chaos.fleet import ORPHANED, Entry, Ledger, Records, judge


def _records(
    runs: dict[str, int], effects: dict[str, int], queued: frozenset[str] = frozenset()
) -> Records:
    return Records(runs, effects, {}, queued)


def _ledger(*entries: Entry) -> Ledger:
    return Ledger({e.key: e for e in entries})


def reply(key: str) -> dict[str, Any]:
    return {"op": "reply", "id": key, "data": {"key": key}}


ACK = {"op": "ack", "id": "s"}
CLEAN = [Entry("c", "call", [reply("c")]), Entry("s", "send", [ACK])]


def test_a_clean_run_passes() -> None:
    tally = judge("clean", _ledger(*CLEAN), _records({"c": 1, "s": 1}, {"c": 1, "s": 1}))
    assert (tally.sent, tally.answered, tally.lost, tally.doubled) == (2, 2, 0, 0)
    assert tally.problems == []
    assert tally.notes == {"reply": 1, "ack": 1}


@pytest.mark.parametrize(
    ("entry", "runs", "effects", "queued", "lost", "doubled"),
    [
        (Entry("s", "send", [ACK]), 0, 0, (), 1, 0),  # acked, never ran
        (Entry("s", "send", [ACK]), 1, 0, (), 1, 0),  # ran once, no effect
        (Entry("s", "send", [ACK]), 2, 2, (), 0, 1),  # effect twice
        (Entry("c", "call", [reply("c"), reply("c")]), 1, 1, (), 0, 1),  # two answers
        (Entry("c", "call", [reply("x")]), 1, 1, (), 1, 0),  # someone else's reply
        (Entry("c", "call", timed_out=True), 1, 1, (), 1, 0),  # no answer, link alive
        (Entry("s", "send", timed_out=True), 1, 1, (), 1, 0),
        (Entry("c", "call", died=True), 0, 0, ("c",), 1, 0),  # queued, never ran
    ],
    ids=["never ran", "no effect", "effect twice", "two answers", "wrong reply",
         "call unanswered", "send unanswered", "queued never ran"],
)  # fmt: skip
def test_it_counts_what_was_lost_or_doubled(
    entry: Entry, runs: int, effects: int, queued: tuple[str, ...], lost: int, doubled: int
) -> None:
    records = _records({entry.key: runs}, {entry.key: effects}, frozenset(queued))
    tally = judge("fault", _ledger(entry), records)
    assert (tally.lost, tally.doubled) == (lost, doubled), tally.problems


def test_a_call_that_died_with_its_gateway_before_the_broker_is_not_lost() -> None:
    tally = judge("gateway", _ledger(Entry("c", "call", died=True)), _records({}, {}))
    assert (tally.lost, tally.problems) == (0, [])
    assert tally.notes["call never reached the broker"] == 1


def test_errors_are_problems_unless_the_scenario_allows_them() -> None:
    ledger = _ledger(Entry("c", "call", [{"op": "error", "id": "c", "code": "unavailable"}]))
    assert judge("calm", ledger, _records({}, {})).problems
    assert not judge("outage", ledger, _records({}, {}), allowed_errors={"unavailable"}).problems


def test_orphaned_once_keys_are_bounded() -> None:
    ledger = _ledger(Entry("s", "send", [ACK]))
    records = _records({"s": 2}, {})
    assert judge("calm", ledger, records).problems == ["1 once-keys orphaned, allowed 0"]
    tally = judge("stall", ledger, records, orphaned_keys=1)
    assert (tally.problems, tally.notes[ORPHANED]) == ([], 1)


def test_an_answer_nobody_asked_for_is_a_problem() -> None:
    ledger = _ledger(*CLEAN)
    ledger.take_stray({"op": "reply", "id": "nobody", "data": None})
    ledger.take_stray(reply("c"))  # a second answer to "c"
    tally = judge("strays", ledger, _records({"c": 1, "s": 1}, {"c": 1, "s": 1}))
    assert tally.doubled == 1
    assert any("unclaimed" in p for p in tally.problems)

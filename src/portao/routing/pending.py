"""The gateway's correlation map: calls sent to a worker and still waiting for an answer.

Every entry leaves by exactly one door: its reply (`pop`), its deadline (`expire`),
its connection closing (`drop_connection`) or shutdown (`drain`). Whoever takes it
out answers the client, so each `call` gets one answer. A reply that finds no entry,
or finds one that belongs to another connection, is counted and dropped.

Deadlines: a gateway gives every call the same timeout, so calls nearly always
arrive in deadline order. Such a call needs no index of its own: the map by message
id keeps insertion order, so the oldest calls are the first due, and removing one
costs a dict deletion. A call whose deadline is earlier than one added before it
(the clock stepped back, or timeouts differ) goes to a heap with lazy deletion:
removing it leaves its heap item behind, skipped when it surfaces, and the heap is
rebuilt when dead items outnumber live calls by far, so it stays within a constant
factor of them.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field

#: Rebuild the heap when it holds more than this many items per live entry (plus
#: `_COMPACT_FLOOR`, so a small map is not rebuilt on every removal).
_COMPACT_RATIO = 2
_COMPACT_FLOOR = 64


@dataclass(slots=True)
class PendingCall:
    """A call in flight: who asked (connection and the client's id) and until when."""

    message_id: str
    conn: int
    client_id: int | str
    deadline: float
    # Its deadline is earlier than one added before it: it is on the heap.
    early: bool = field(default=False, compare=False, repr=False)


class PendingCalls:
    """Calls in flight by message id, by connection, and by deadline."""

    __slots__ = ("_by_conn", "_by_id", "_heap", "_latest", "_seq", "late_or_unknown")

    def __init__(self) -> None:
        self._by_id: dict[str, PendingCall] = {}  # in insertion order
        self._by_conn: dict[int, dict[int | str, PendingCall]] = {}
        self._latest = -math.inf  # the latest deadline added so far
        # Early calls only: (deadline, insertion number, call); the number keeps
        # equal deadlines in order and spares comparing calls.
        self._heap: list[tuple[float, int, PendingCall]] = []
        self._seq = itertools.count()
        self.late_or_unknown = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def add(self, message_id: str, conn: int, client_id: int | str, deadline: float) -> PendingCall:
        """Track a call; `ValueError` if its message id or client id is pending already."""
        if message_id in self._by_id or self.has_client_id(conn, client_id):
            raise ValueError(f"call {message_id!r} ({conn}, {client_id!r}) is already pending")
        call = PendingCall(message_id, conn, client_id, deadline)
        self._by_id[message_id] = call
        self._by_conn.setdefault(conn, {})[client_id] = call
        if deadline >= self._latest:
            self._latest = deadline
        else:
            call.early = True
            heapq.heappush(self._heap, (deadline, next(self._seq), call))
        return call

    def has_client_id(self, conn: int, client_id: int | str) -> bool:
        """True when connection `conn` has a call with this id waiting."""
        calls = self._by_conn.get(conn)
        return calls is not None and client_id in calls

    def count(self, conn: int) -> int:
        """How many calls connection `conn` has waiting."""
        calls = self._by_conn.get(conn)
        return 0 if calls is None else len(calls)

    def pop(self, message_id: str, conn: int) -> PendingCall | None:
        """Take the call a reply answers; None (counted) if it is not waiting on `conn`."""
        call = self._by_id.get(message_id)
        if call is None or call.conn != conn:
            self.late_or_unknown += 1
            return None
        self._forget(call)
        return call

    def expire(self, now: float) -> list[PendingCall]:
        """Take every call whose deadline is at or before `now`, earliest first."""
        expired: list[PendingCall] = []
        for call in self._by_id.values():  # in order: due ones first
            if not call.early:
                if call.deadline > now:
                    break
                expired.append(call)
        heap = self._heap
        early = False
        while heap and heap[0][0] <= now:
            call = heapq.heappop(heap)[2]
            if self._is_live(call):
                expired.append(call)
                early = True
        for call in expired:
            self._forget(call)
        if early:
            expired.sort(key=_deadline)
        return expired

    def next_deadline(self) -> float | None:
        """The earliest deadline still waiting, or None when nothing is."""
        first = next((call.deadline for call in self._by_id.values() if not call.early), None)
        heap = self._heap
        while heap and not self._is_live(heap[0][2]):
            heapq.heappop(heap)
        if heap and (first is None or heap[0][0] < first):
            return heap[0][0]
        return first

    def drop_connection(self, conn: int) -> list[PendingCall]:
        """Take every call of a closed connection (their replies will be dropped)."""
        calls = self._by_conn.pop(conn, None)
        if calls is None:
            return []
        for call in calls.values():
            del self._by_id[call.message_id]
        self._maybe_compact()
        return list(calls.values())

    def drain(self) -> list[PendingCall]:
        """Take every call (shutdown: each gets its `shutdown` error)."""
        calls = list(self._by_id.values())
        self._by_id.clear()
        self._by_conn.clear()
        self._heap.clear()
        self._latest = -math.inf
        return calls

    def _is_live(self, call: PendingCall) -> bool:
        return self._by_id.get(call.message_id) is call

    def _forget(self, call: PendingCall) -> None:
        del self._by_id[call.message_id]
        calls = self._by_conn[call.conn]
        del calls[call.client_id]
        if not calls:
            del self._by_conn[call.conn]
        self._maybe_compact()

    def _maybe_compact(self) -> None:
        if len(self._heap) > _COMPACT_RATIO * len(self._by_id) + _COMPACT_FLOOR:
            # In place: `expire` and `next_deadline` may hold the list.
            self._heap[:] = [item for item in self._heap if self._is_live(item[2])]
            heapq.heapify(self._heap)


def _deadline(call: PendingCall) -> float:
    return call.deadline

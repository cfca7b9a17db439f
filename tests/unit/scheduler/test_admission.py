"""The best-effort queue: dispatch order (priority, then arrival), no overtaking on shared
capacity, the starvation bound on a fake clock, the size bound with shedding, cancel and drain.

Decisions come from the real ``slomesh`` policy on small views: an instance "runs" a request
with a 1 ms TPOT target (`ClusterView.track_inflight`) so that no best-effort request may join
it (``protect-inflight``) until it is untracked.
"""

from __future__ import annotations

import pytest

from slomesh.scheduler.admission import BestEffortQueue, BestEffortQueueFull, QueuedRequest
from slomesh.scheduler.policy import PlacementDecision, Policy, make_policy
from slomesh.scheduler.validation import validate_request
from slomesh.scheduler.view import ClusterView
from slomesh.slo import TenantPolicy
from slomesh.v1 import scheduler_pb2
from tests.unit.scheduler.factories import MODEL, SLO, make_instance, make_request, make_state
from tests.unit.scheduler.test_policy import T0, view_with

WAIT_MS = 10_000.0


class FakeClock:
    """A settable clock, Unix ns."""

    def __init__(self, t: int = T0):
        self.t = t

    def __call__(self) -> int:
        return self.t

    def advance_ms(self, ms: float) -> None:
        self.t += round(ms * 1e6)


def best_effort(request_id: str, priority: int = 0, residency: str = ""):
    """A batch-class (best-effort tier) request; `residency` pins it to one region."""
    msg = scheduler_pb2.GenerateRequest(
        request_id=request_id,
        model=MODEL,
        prompt_token_ids=list(range(1, 101)),
        max_tokens=16,
        slo_class="batch",
        origin_region="washington-dc",
        tenant="pinned" if residency else "",
        priority=priority,
    )
    tenants = {"pinned": TenantPolicy(name="pinned", allowed_regions=frozenset({residency}))}
    return validate_request(
        msg,
        models={MODEL: 32768},
        slo_classes=SLO.classes,
        default_slo_class=SLO.default_class,
        regions={"washington-dc", "frankfurt", "tokyo"},
        tenants=tenants if residency else None,
    )


class Placer:
    """A `TryPlace` over a real policy and view that records what it was asked."""

    def __init__(self, view: ClusterView, policy: Policy | None = None):
        self.view = view
        self.policy = policy or make_policy("slomesh")
        self.calls: list[tuple[str, frozenset[str], bool]] = []

    def __call__(
        self, entry: QueuedRequest, held: frozenset[str], expired: bool
    ) -> PlacementDecision:
        self.calls.append((entry.request_id, held, expired))
        decision = self.policy.place(
            entry.request,
            self.view,
            exclude_regions=entry.exclude_regions,
            exclude_instances=held,
            wait_expired=expired,
        )
        decision.record_in(self.view)
        return decision


def busy_view(*instances: tuple[str, str]) -> ClusterView:
    """One H100 per (region, instance id), each running a request with a 1 ms TPOT target."""
    view = view_with([make_state(r, [make_instance(i)]) for r, i in instances])
    for region, iid in instances:
        view.track_inflight(region, iid, f"slo-on-{iid}", 1.0)
    return view


class TestOrder:
    def test_dispatch_order_is_priority_then_arrival(self):
        queue = BestEffortQueue(WAIT_MS, 10, FakeClock())
        for rid, priority in [("a", 1), ("b", 0), ("c", 1), ("d", 0), ("e", -1)]:
            queue.offer(best_effort(rid, priority))
        assert [e.request_id for e in queue] == ["e", "b", "d", "a", "c"]
        placer = Placer(view_with([make_state("washington-dc", [make_instance("w")])]))
        out = queue.dispatch(placer)
        assert [c[0] for c in placer.calls] == ["e", "b", "d", "a", "c"]
        assert [d.entry.request_id for d in out] == ["e", "b", "d", "a", "c"]
        assert all(d.decision.chosen is not None and not d.forced for d in out)
        assert len(queue) == 0 and queue.next_deadline_unix_ns() is None

    def test_a_waiting_request_holds_its_instances_from_later_ones(self):
        view = busy_view(("washington-dc", "w"))
        view.apply_state(make_state("tokyo", [make_instance("t")]), received_unix_ns=T0)
        queue = BestEffortQueue(WAIT_MS, 10, FakeClock())
        queue.offer(best_effort("first", residency="washington-dc"))
        queue.offer(best_effort("anywhere"))
        queue.offer(best_effort("second", priority=1, residency="washington-dc"))
        placer = Placer(view)

        out = queue.dispatch(placer)
        # "first" can only run on w, which is busy: it waits and holds w. "anywhere" must not
        # take w before it, but may run in Tokyo; "second" has nowhere else to go.
        assert [(d.entry.request_id, d.decision.chosen.instance_id) for d in out] == [
            ("anywhere", "t")
        ]
        assert placer.calls == [
            ("first", frozenset(), False),
            ("anywhere", frozenset({"w"}), False),
            ("second", frozenset({"w"}), False),
        ]
        assert [e.request_id for e in queue] == ["first", "second"]
        assert all(e.attempts == 1 for e in queue)

        # w's request ends: both go to w, the earlier first.
        view.untrack_inflight("washington-dc", "w", "slo-on-w")
        out = queue.dispatch(placer)
        assert [d.entry.request_id for d in out] == ["first", "second"]
        assert {d.decision.chosen.instance_id for d in out} == {"w"}
        # w is idle now: both meet the batch class's E2E target there.
        assert [d.decision.outcome for d in out] == ["placed", "placed"]

    def test_entries_whose_instances_are_all_held_are_not_tried_again_for_a_while(self):
        queue = BestEffortQueue(WAIT_MS, 10, FakeClock(), refresh_passes=3)
        for rid in ("head", "b", "c"):
            queue.offer(best_effort(rid, residency="washington-dc"))
        placer = Placer(busy_view(("washington-dc", "w")))
        assert queue.dispatch(placer) == []
        assert [c[0] for c in placer.calls] == ["head", "b", "c"]
        assert [e.usable_instances for e in queue] == [frozenset({"w"})] * 3
        # Only the head is tried while it holds w; the others' instance sets are recomputed
        # every 3 passes.
        for _ in range(2):
            placer.calls.clear()
            assert queue.dispatch(placer) == []
            assert [c[0] for c in placer.calls] == ["head"]
        placer.calls.clear()
        queue.dispatch(placer)
        assert [c[0] for c in placer.calls] == ["head", "b", "c"]
        with pytest.raises(ValueError, match="refresh_passes"):
            BestEffortQueue(WAIT_MS, 10, FakeClock(), refresh_passes=0)

    def test_new_best_effort_requests_wait_behind_queued_ones(self):
        queue = BestEffortQueue(WAIT_MS, 10, FakeClock())
        assert not queue.must_wait(best_effort("x"))
        queue.offer(best_effort("queued", priority=1))
        assert queue.must_wait(best_effort("same", priority=1))
        assert queue.must_wait(best_effort("later", priority=3))
        assert not queue.must_wait(best_effort("urgent", priority=0))
        assert not queue.must_wait(make_request(slo_class="chat", priority=5))  # refuse tier


class TestStarvationBound:
    def test_a_request_waits_at_most_max_wait_then_goes_to_the_lowest_ttft(self):
        clock = FakeClock()
        queue = BestEffortQueue(WAIT_MS, 10, clock)
        placer = Placer(busy_view(("washington-dc", "w")))
        queue.offer(best_effort("old"))
        assert queue.next_deadline_unix_ns() == T0 + round(WAIT_MS * 1e6)
        clock.advance_ms(5_000)
        queue.offer(best_effort("young"))
        assert queue.next_deadline_unix_ns() == T0 + round(WAIT_MS * 1e6)

        clock.advance_ms(4_999.999)
        assert queue.dispatch(placer) == []
        clock.advance_ms(0.001)  # "old" has waited exactly max_wait_ms
        (out,) = queue.dispatch(placer)
        assert out.entry.request_id == "old" and out.forced
        assert out.waited_ms == pytest.approx(WAIT_MS)
        assert out.decision.outcome == "best_effort" and out.decision.chosen.instance_id == "w"
        assert placer.calls[-2:] == [("old", frozenset(), True), ("young", frozenset(), False)]
        # "young" keeps its own deadline, 5 s later.
        assert queue.next_deadline_unix_ns() == T0 + round((5_000 + WAIT_MS) * 1e6)
        clock.advance_ms(5_000)
        (out,) = queue.dispatch(placer)
        assert out.entry.request_id == "young" and out.forced and out.waited_ms == WAIT_MS

    def test_an_expired_request_with_no_candidate_at_all_leaves_as_failed(self):
        clock = FakeClock()
        queue = BestEffortQueue(WAIT_MS, 10, clock)
        placer = Placer(view_with([]))  # no region has published state
        queue.offer(best_effort("r"))
        assert queue.dispatch(placer) == []  # unavailable now: it keeps waiting
        clock.advance_ms(WAIT_MS)
        (out,) = queue.dispatch(placer)
        assert out.forced and out.decision.chosen is None
        assert out.decision.outcome == "unavailable" and len(queue) == 0

    def test_zero_max_wait_places_at_once(self):
        queue = BestEffortQueue(0.0, 10, FakeClock())
        queue.offer(best_effort("r"))
        (out,) = queue.dispatch(Placer(busy_view(("washington-dc", "w"))))
        assert out.forced and out.decision.chosen.instance_id == "w"


class TestBound:
    def test_a_full_queue_refuses_or_sheds_the_least_urgent(self):
        clock = FakeClock()
        queue = BestEffortQueue(WAIT_MS, 2, clock)
        queue.offer(best_effort("a"))
        clock.advance_ms(1_000)
        queue.offer(best_effort("b"))
        with pytest.raises(BestEffortQueueFull) as info:
            queue.offer(best_effort("c"))
        # A slot frees when "a"'s wait expires, 9 s from now.
        assert info.value.retry_after_ms == pytest.approx(WAIT_MS - 1_000)
        with pytest.raises(BestEffortQueueFull):
            queue.offer(best_effort("d", priority=1))
        entry, shed = queue.offer(best_effort("e", priority=-1))
        assert entry.request_id == "e" and shed is not None and shed.request_id == "b"
        assert [e.request_id for e in queue] == ["e", "a"] and "b" not in queue
        with pytest.raises(ValueError, match="queued already"):
            queue.offer(best_effort("a", priority=-9))

    def test_a_zero_limit_refuses_every_request(self):
        queue = BestEffortQueue(WAIT_MS, 0, FakeClock())
        with pytest.raises(BestEffortQueueFull) as info:
            queue.offer(best_effort("a", priority=-100))
        assert info.value.retry_after_ms is None and len(queue) == 0

    @pytest.mark.parametrize(
        ("kwargs", "field"),
        [
            ({"max_wait_ms": -1.0}, "max_wait_ms"),
            ({"max_wait_ms": float("inf")}, "max_wait_ms"),
            ({"limit": -1}, "limit"),
        ],
    )
    def test_bad_settings_name_the_field(self, kwargs, field):
        with pytest.raises(ValueError, match=field):
            BestEffortQueue(**{"max_wait_ms": WAIT_MS, "limit": 1, **kwargs}, clock_ns=FakeClock())

    def test_profile_settings(self):
        policy = make_policy("slomesh", best_effort_max_wait_ms=2_500, best_effort_queue_limit=7)
        queue = BestEffortQueue.for_profile(policy.profile, FakeClock())
        assert (queue.max_wait_ms, queue.limit) == (2_500, 7)


class TestNothingIsLost:
    def test_cancel_removes_and_drain_empties_in_order(self):
        queue = BestEffortQueue(WAIT_MS, 10, FakeClock())
        for rid, priority in [("a", 0), ("b", 2), ("c", 1)]:
            queue.offer(best_effort(rid, priority), payload=f"handle-{rid}")
        removed = queue.remove("a")
        assert removed is not None and removed.payload == "handle-a" and "a" not in queue
        assert queue.remove("a") is None and queue.remove("never") is None
        placer = Placer(busy_view(("washington-dc", "w")))
        assert queue.dispatch(placer) == []
        assert [c[0] for c in placer.calls] == ["c", "b"]  # "a" is not tried
        drained = queue.drain()
        assert [e.request_id for e in drained] == ["c", "b"]
        assert [e.payload for e in drained] == ["handle-c", "handle-b"]
        assert len(queue) == 0 and queue.dispatch(placer) == []
        assert len(placer.calls) == 2

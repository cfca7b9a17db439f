"""Tests of the per-link bandwidth scheduler, on a virtual-time event loop (deterministic)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import pytest

from slomesh.transfer.bandwidth import (
    DEFAULT_BURST_BYTES,
    LinkScheduler,
    TrafficClass,
)
from slomesh.v1 import state_pb2

from .virtual_loop import run_virtual

MIB = 1024 * 1024
FG = TrafficClass.FOREGROUND_KV
PREFETCH = TrafficClass.PREFETCH_KV
PREWARM = TrafficClass.PREWARM_WEIGHTS


def make_scheduler(capacity_bytes_per_s: float = 100 * MIB, **kwargs) -> LinkScheduler:
    """A scheduler on the running (virtual) loop's clock."""
    return LinkScheduler(capacity_bytes_per_s, clock=asyncio.get_running_loop().time, **kwargs)


async def stream(
    sched: LinkScheduler,
    cls: TrafficClass,
    chunk_bytes: int,
    log: list[tuple[float, TrafficClass, int]],
    *,
    chunks: int | None = None,
    until_s: float | None = None,
) -> None:
    """Sends chunks back to back (as a transfer does), logging (grant time, class, bytes)."""
    loop = asyncio.get_running_loop()
    sent = 0
    while (chunks is None or sent < chunks) and (until_s is None or loop.time() < until_s):
        await sched.send(chunk_bytes, cls)
        log.append((loop.time(), cls, chunk_bytes))
        sent += 1


def bytes_of(log, cls: TrafficClass, start_s: float = 0.0, end_s: float = float("inf")) -> int:
    return sum(n for t, c, n in log if c == cls and start_s <= t < end_s)


class TestRateCap:
    def test_granted_bytes_never_exceed_capacity_times_time_plus_burst(self) -> None:
        capacity = 50 * MIB
        burst = 2 * MIB

        async def main():
            sched = make_scheduler(capacity, burst_bytes=burst)
            log: list = []
            await asyncio.gather(
                stream(sched, PREWARM, MIB, log, until_s=10.0),
                stream(sched, PREFETCH, 256 * 1024, log, until_s=10.0),
                stream(sched, FG, 3 * MIB, log, until_s=3.0),
            )
            return log

        log = run_virtual(main())
        times = sorted(log)
        # Token-bucket conformance (RFC 2215): over any [t_i, t_j], bytes <= C (t_j - t_i) + b,
        # where a chunk larger than the bucket (the 3 MiB ones) counts as the bucket's depth.
        # With S_k the bytes of grants 0..k: S_j - S_(i-1) - C (t_j - t_i) <= depth for i <= j.
        depth = max(burst, 3 * MIB)
        before = 0  # S_(i-1)
        lowest = float("inf")  # min over i <= j of S_(i-1) - C t_i
        for t, _, nbytes in times:
            lowest = min(lowest, before - capacity * t)
            before += nbytes
            assert before - capacity * t - lowest <= depth + 1.0, t
        # Busy link: the whole capacity is granted (10 s of it, plus the initial burst at most).
        granted = sum(n for t, _, n in log if t <= 10.0)
        assert granted >= 0.99 * capacity * 10.0

    def test_chunks_larger_than_the_bucket_are_paced_at_capacity(self) -> None:
        capacity = 10 * MIB

        async def main():
            sched = make_scheduler(capacity, burst_bytes=MIB)
            log: list = []
            await stream(sched, PREWARM, 4 * MIB, log, chunks=10)
            return log

        log = run_virtual(main())
        # The first chunk takes the full bucket into debt; each next waits for 4 MiB of tokens.
        gaps = [b[0] - a[0] for a, b in itertools.pairwise(log)]
        assert gaps == pytest.approx([4 * MIB / capacity] * 9)

    def test_set_capacity_changes_the_rate_from_now_on(self) -> None:
        async def main():
            sched = make_scheduler(10 * MIB, burst_bytes=MIB)
            log: list = []
            task = asyncio.create_task(stream(sched, PREWARM, MIB, log, until_s=4.0))
            await asyncio.sleep(2.0)
            sched.set_capacity(40 * MIB)
            await task
            return sched, log

        sched, log = run_virtual(main())
        assert sched.capacity_bytes_per_s == 40 * MIB
        assert bytes_of(log, PREWARM, 0.5, 2.0) == pytest.approx(10 * MIB * 1.5, abs=MIB)
        assert bytes_of(log, PREWARM, 2.5, 4.0) == pytest.approx(40 * MIB * 1.5, abs=MIB)


class TestStrictPriority:
    def test_foreground_is_granted_before_queued_background(self) -> None:
        async def main():
            sched = make_scheduler(10 * MIB, burst_bytes=MIB)
            order: list[str] = []

            async def one(name: str, cls: TrafficClass) -> None:
                await sched.send(MIB, cls)
                order.append(name)

            tasks = [asyncio.create_task(one(f"bg{i}", PREWARM)) for i in range(3)]
            tasks += [asyncio.create_task(one(f"pf{i}", PREFETCH)) for i in range(2)]
            await asyncio.sleep(0)  # the background is queued (bg0 took the full bucket)
            tasks += [asyncio.create_task(one(f"fg{i}", FG)) for i in range(2)]
            await asyncio.gather(*tasks)
            return order

        order = run_virtual(main())
        assert order[0] == "bg0"
        assert order[1:3] == ["fg0", "fg1"]
        assert sorted(order[3:]) == ["bg1", "bg2", "pf0", "pf1"]

    def test_foreground_during_background_takes_about_its_idle_time(self) -> None:
        capacity = 100 * MIB
        fg_chunks = 64

        async def fg_alone() -> float:
            sched = make_scheduler(capacity)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await stream(sched, FG, MIB, [], chunks=fg_chunks)
            return loop.time() - t0

        async def fg_during_background() -> tuple[float, list]:
            sched = make_scheduler(capacity)
            loop = asyncio.get_running_loop()
            log: list = []
            bg = [
                asyncio.create_task(stream(sched, PREWARM, MIB, log, until_s=3.0)),
                asyncio.create_task(stream(sched, PREFETCH, MIB, log, until_s=3.0)),
            ]
            await asyncio.sleep(1.0)
            t0 = loop.time()
            await stream(sched, FG, MIB, log, chunks=fg_chunks)
            elapsed = loop.time() - t0
            await asyncio.gather(*bg)
            return elapsed, [(t, c) for t, c, _ in log if t0 <= t <= t0 + elapsed]

        idle_s = run_virtual(fg_alone())
        busy_s, during = run_virtual(fg_during_background())
        # Idle: the first burst is free, then the capacity. Busy: the bucket starts empty.
        assert idle_s == pytest.approx((fg_chunks * MIB - DEFAULT_BURST_BYTES) / capacity)
        assert busy_s <= fg_chunks * MIB / capacity + MIB / capacity + 1e-9
        # While the foreground was sending, the background got nothing but its grant at t0.
        assert sum(1 for _, c in during if c != FG) <= 1

    def test_background_gets_what_the_foreground_leaves(self) -> None:
        capacity = 100 * MIB

        async def main():
            sched = make_scheduler(capacity)
            loop = asyncio.get_running_loop()
            log: list = []

            async def paced_foreground() -> None:  # half the link: 1 MiB every 2 chunk times
                due = 0.0
                while due < 5.0:
                    await asyncio.sleep(max(0.0, due - loop.time()))
                    await sched.send(MIB, FG)
                    log.append((loop.time(), FG, MIB))
                    due += 2 * MIB / capacity

            await asyncio.gather(paced_foreground(), stream(sched, PREWARM, MIB, log, until_s=5.0))
            return log

        log = run_virtual(main())
        fg = bytes_of(log, FG, 1.0, 5.0) / 4.0
        bg = bytes_of(log, PREWARM, 1.0, 5.0) / 4.0
        assert fg == pytest.approx(capacity / 2, rel=0.05)
        assert fg + bg == pytest.approx(capacity, rel=0.02)


class TestForegroundFlows:
    """A foreground transfer holds the link from its first chunk to its last (`open_flow`)."""

    @staticmethod
    async def held_back_foreground(sched, log, *, with_flow: bool) -> tuple[float, float]:
        """At 1 s, 16 foreground chunks, each followed by 20 ms (two chunk times at 100 MiB/s)
        in which the receiver holds the stream back, so no foreground chunk waits; returns the
        times its flow opened and closed."""
        loop = asyncio.get_running_loop()
        await asyncio.sleep(1.0)
        opened_s = loop.time()
        with sched.open_flow(FG) if with_flow else contextlib.nullcontext():
            for _ in range(16):
                await sched.send(MIB, FG)
                log.append((loop.time(), FG, MIB))
                await asyncio.sleep(0.02)
            closed_s = loop.time()
        return opened_s, closed_s

    @pytest.mark.parametrize("with_flow", [False, True])
    def test_background_waits_for_the_whole_flow_not_only_its_waiting_chunks(
        self, with_flow: bool
    ) -> None:
        capacity = 100 * MIB

        async def main():
            sched = make_scheduler(capacity)
            log: list = []
            bg = asyncio.create_task(stream(sched, PREWARM, MIB, log, until_s=4.0))
            opened_s, closed_s = await self.held_back_foreground(sched, log, with_flow=with_flow)
            await bg
            return log, opened_s, closed_s, sched.stats()

        log, opened_s, closed_s, stats = run_virtual(main())
        during = sum(n for t, c, n in log if c == PREWARM and opened_s < t < closed_s)
        if with_flow:
            assert during == 0
            # Closed: the background has the whole link again.
            after = bytes_of(log, PREWARM, closed_s + 0.1, closed_s + 1.1)
            assert after == pytest.approx(capacity, abs=MIB)
        else:
            # Without a flow the background takes the gaps: what the flow is there to stop.
            assert during >= 16 * MIB
        assert stats.open_flows[FG] == 0
        assert stats.granted_bytes_total[FG] == 16 * MIB

    def test_the_last_foreground_flow_to_close_releases_the_background(self) -> None:
        async def main():
            sched = make_scheduler(10 * MIB, burst_bytes=MIB)
            loop = asyncio.get_running_loop()
            a, b = sched.open_flow(FG), sched.open_flow(FG)
            bg = asyncio.create_task(sched.send(MIB, PREWARM))  # the bucket is full
            await asyncio.sleep(5.0)
            held = (bg.done(), sched.stats().open_flows[FG])
            a.close()
            a.close()  # idempotent: `b` still holds the link
            await asyncio.sleep(1.0)
            still_held = (bg.done(), sched.stats().open_flows[FG])
            b.close()
            await bg
            return held, still_held, loop.time(), sched.stats()

        held, still_held, granted_s, stats = run_virtual(main())
        assert held == (False, 2)
        assert still_held == (False, 1)
        assert granted_s == pytest.approx(6.0)  # at the close, no timer needed to wake it
        assert stats.open_flows[FG] == 0 and stats.total_queued_bytes == 0

    def test_a_flow_ended_by_an_exception_or_a_cancel_is_released(self) -> None:
        async def main():
            sched = make_scheduler(10 * MIB, burst_bytes=MIB)
            loop = asyncio.get_running_loop()
            with pytest.raises(RuntimeError), sched.open_flow(FG):
                await sched.send(MIB, FG)  # empties the bucket
                raise RuntimeError("stream broke")
            after_error = sched.stats().open_flows[FG]

            async def foreground_transfer() -> None:
                with sched.open_flow(FG):
                    await sched.send(MIB, FG)  # waits 0.1 s for tokens
                    await asyncio.sleep(10.0)  # the receiver holds the stream back

            fg = asyncio.create_task(foreground_transfer())
            await asyncio.sleep(0.5)  # fg granted at 0.1 s, now between chunks
            bg = asyncio.create_task(sched.send(MIB, PREWARM))
            await asyncio.sleep(0.5)
            held = bg.done()
            fg.cancel()
            with pytest.raises(asyncio.CancelledError):
                await fg
            await bg
            return after_error, held, loop.time(), sched.stats()

        after_error, held, granted_s, stats = run_virtual(main())
        assert after_error == 0
        assert held is False
        assert granted_s == pytest.approx(1.0)  # at the cancel
        assert stats.open_flows[FG] == 0
        assert stats.granted_bytes_total == {FG: 2 * MIB, PREFETCH: 0, PREWARM: MIB}

    def test_a_cancelled_flow_with_a_waiting_chunk_leaves_nothing_behind(self) -> None:
        async def main():
            sched = make_scheduler(10 * MIB, burst_bytes=MIB)
            loop = asyncio.get_running_loop()
            await sched.send(MIB, PREWARM)  # empties the bucket

            async def foreground_transfer() -> None:
                with sched.open_flow(FG):
                    await sched.send(MIB, FG)  # due at 0.1 s

            fg = asyncio.create_task(foreground_transfer())
            bg = asyncio.create_task(sched.send(MIB, PREWARM))
            await asyncio.sleep(0.05)
            fg.cancel()
            await bg
            return loop.time(), sched.stats()

        granted_s, stats = run_virtual(main())
        assert granted_s == pytest.approx(0.1)  # the tokens the foreground would have had
        assert stats.open_flows[FG] == 0
        assert stats.queued_bytes[FG] == 0 and stats.granted_bytes_total[FG] == 0

    def test_background_flows_are_counted_and_hold_nothing(self) -> None:
        async def main():
            sched = make_scheduler(10 * MIB, burst_bytes=2 * MIB)
            loop = asyncio.get_running_loop()
            with sched.open_flow(PREFETCH), sched.open_flow(PREWARM):
                await sched.send(MIB, PREWARM)
                await sched.send(MIB, PREFETCH)
                during = sched.stats().open_flows
            return loop.time(), during, sched.stats().open_flows

        granted_s, during, after = run_virtual(main())
        assert granted_s == 0.0
        assert during == {FG: 0, PREFETCH: 1, PREWARM: 1}
        assert after == {FG: 0, PREFETCH: 0, PREWARM: 0}

    def test_an_unknown_class_opens_no_flow(self) -> None:
        sched = LinkScheduler(1e6)
        with pytest.raises(ValueError, match="TrafficClass"):
            sched.open_flow(7)
        assert sum(sched.stats().open_flows.values()) == 0


class TestFairQueueing:
    @pytest.mark.parametrize(
        ("weights", "prefetch_chunk", "prewarm_chunk"),
        [
            ({PREFETCH: 1.0, PREWARM: 1.0}, MIB, MIB),
            ({PREFETCH: 1.0, PREWARM: 3.0}, MIB, MIB),
            ({PREFETCH: 2.0, PREWARM: 1.0}, 256 * 1024, MIB),  # byte-fair, not chunk-fair
        ],
    )
    def test_shares_follow_the_weights(self, weights, prefetch_chunk, prewarm_chunk) -> None:
        capacity = 100 * MIB

        async def main():
            sched = make_scheduler(capacity, class_weights=weights)
            log: list = []
            await asyncio.gather(
                *(stream(sched, PREFETCH, prefetch_chunk, log, until_s=10.0) for _ in range(2)),
                *(stream(sched, PREWARM, prewarm_chunk, log, until_s=10.0) for _ in range(2)),
            )
            return log

        log = run_virtual(main())
        prefetch = bytes_of(log, PREFETCH, 0.0, 10.0)
        prewarm = bytes_of(log, PREWARM, 0.0, 10.0)
        assert prewarm / prefetch == pytest.approx(weights[PREWARM] / weights[PREFETCH], rel=0.02)
        assert prefetch + prewarm >= 0.99 * capacity * 10.0

    def test_a_class_alone_gets_the_whole_link(self) -> None:
        capacity = 100 * MIB

        async def main():
            sched = make_scheduler(capacity, class_weights={PREFETCH: 1.0, PREWARM: 9.0})
            log: list = []
            await stream(sched, PREFETCH, MIB, log, until_s=5.0)
            return log

        log = run_virtual(main())
        assert bytes_of(log, PREFETCH, 1.0, 5.0) == pytest.approx(4.0 * capacity, abs=MIB)

    def test_an_idle_class_banks_no_credit(self) -> None:
        """A class that was idle while the other ran gets its fair share on return, not a
        burst that starves the other until it has caught up."""
        capacity = 100 * MIB

        async def main():
            sched = make_scheduler(capacity)
            log: list = []
            a = asyncio.create_task(stream(sched, PREWARM, MIB, log, until_s=6.0))
            await asyncio.sleep(3.0)
            await stream(sched, PREFETCH, MIB, log, until_s=6.0)
            await a
            return log

        log = run_virtual(main())
        prewarm = bytes_of(log, PREWARM, 3.0, 6.0)
        prefetch = bytes_of(log, PREFETCH, 3.0, 6.0)
        assert prewarm / prefetch == pytest.approx(1.0, rel=0.05)


class TestEarliestDeadlineFirst:
    def test_order_within_a_class(self) -> None:
        async def main():
            sched = make_scheduler(10 * MIB, burst_bytes=MIB)
            order: list[str] = []

            async def one(name: str, deadline: float | None) -> None:
                await sched.send(MIB, PREFETCH, deadline)
                order.append(name)

            tasks = [asyncio.create_task(one("first", None))]  # takes the full bucket
            await asyncio.sleep(0)
            for name, deadline in [
                ("d30", 30.0),
                ("none-a", None),
                ("d10", 10.0),
                ("none-b", None),
                ("d20", 20.0),
            ]:
                tasks.append(asyncio.create_task(one(name, deadline)))
            await asyncio.gather(*tasks)
            return order

        assert run_virtual(main()) == ["first", "d10", "d20", "d30", "none-a", "none-b"]


class TestCancellation:
    def test_a_cancelled_queued_chunk_leaves_no_reservation(self) -> None:
        capacity = 10 * MIB

        async def main():
            sched = make_scheduler(capacity, burst_bytes=MIB)
            loop = asyncio.get_running_loop()
            await sched.send(MIB, PREWARM)  # empties the bucket
            a = asyncio.create_task(sched.send(MIB, PREWARM))
            b = asyncio.create_task(sched.send(MIB, PREWARM))
            await asyncio.sleep(0)
            assert sched.stats().queued_bytes[PREWARM] == 2 * MIB
            a.cancel()
            with pytest.raises(asyncio.CancelledError):
                await a
            assert sched.stats().queued_bytes[PREWARM] == MIB
            await b
            return loop.time(), sched.stats()

        t_b, stats = run_virtual(main())
        assert t_b == pytest.approx(MIB / capacity)  # b went first: a took nothing
        assert stats.queued_bytes[PREWARM] == 0
        assert stats.granted_bytes_total[PREWARM] == 2 * MIB

    def test_a_cancelled_foreground_head_unblocks_the_background(self) -> None:
        capacity = 10 * MIB

        async def main():
            sched = make_scheduler(capacity, burst_bytes=2 * MIB)
            loop = asyncio.get_running_loop()
            await sched.send(2 * MIB, PREWARM)  # empties the bucket
            fg = asyncio.create_task(sched.send(2 * MIB, FG))  # due at 0.2 s
            bg = asyncio.create_task(sched.send(MIB, PREWARM))  # behind it
            await asyncio.sleep(0.05)
            fg.cancel()
            await bg
            return loop.time()

        assert run_virtual(main()) == pytest.approx(MIB / capacity)

    def test_a_grant_whose_sender_is_cancelled_is_refunded(self) -> None:
        capacity = 1 * MIB

        async def main():
            sched = make_scheduler(capacity, burst_bytes=2 * MIB)
            loop = asyncio.get_running_loop()
            await sched.send(2 * MIB, PREWARM)  # empties the bucket at t=0
            fg = asyncio.create_task(sched.send(2 * MIB, FG))  # needs 2 MiB: t=2 s
            a = asyncio.create_task(sched.send(MIB, PREWARM))  # queued behind fg
            await asyncio.sleep(1.5)  # 1.5 MiB of tokens
            fg.cancel()  # its future is cancelled now; its task has not run yet
            sched.set_capacity(capacity)  # re-plans synchronously: `a` is granted now...
            a.cancel()  # ...and cancelled before it could send: the grant is refunded
            for task in (fg, a):
                with pytest.raises(asyncio.CancelledError):
                    await task
            t0 = loop.time()
            await sched.send(MIB, PREWARM)  # 1.5 MiB of tokens again: granted at once
            return t0, loop.time(), sched.stats()

        t0, t_d, stats = run_virtual(main())
        assert t0 == pytest.approx(1.5)
        assert t_d == pytest.approx(1.5)
        assert stats.granted_bytes_total[PREWARM] == 3 * MIB
        assert stats.granted_bytes_total[FG] == 0
        assert stats.total_queued_bytes == 0


class TestStats:
    def test_throughput_spare_and_queues(self) -> None:
        capacity = 100 * MIB

        async def main():
            sched = make_scheduler(capacity, window_s=1.0)
            loop = asyncio.get_running_loop()
            empty = sched.stats()

            async def paced_foreground() -> None:  # a quarter of the link
                due = 0.0
                while due < 4.0:
                    await asyncio.sleep(max(0.0, due - loop.time()))
                    await sched.send(MIB, FG)
                    due += 4 * MIB / capacity

            log: list = []
            tasks = [
                asyncio.create_task(paced_foreground()),
                asyncio.create_task(stream(sched, PREWARM, MIB, log, until_s=4.0)),
                asyncio.create_task(stream(sched, PREWARM, MIB, log, until_s=4.0)),
            ]
            await asyncio.sleep(3.0)
            busy = sched.stats()
            await asyncio.gather(*tasks)
            await asyncio.sleep(2.0)
            return empty, busy, sched.stats()

        empty, busy, after = run_virtual(main())
        assert empty.throughput_bytes_per_s == 0.0
        assert empty.spare_bytes_per_s == capacity
        assert busy.capacity_bytes_per_s == capacity
        assert busy.throughput_bytes_per_s == pytest.approx(capacity, rel=0.03)
        assert busy.foreground_bytes_per_s == pytest.approx(capacity / 4, rel=0.05)
        assert busy.spare_bytes_per_s == pytest.approx(capacity - busy.foreground_bytes_per_s)
        assert busy.class_throughput_bytes_per_s[PREWARM] == pytest.approx(
            capacity * 3 / 4, rel=0.05
        )
        # One prewarm chunk waits while the other is granted (two senders, one bucket).
        assert busy.queued_bytes[PREWARM] >= MIB
        assert busy.queued_bytes[FG] == 0
        # Idle again for longer than the window: no throughput, everything spare.
        assert after.throughput_bytes_per_s == 0.0
        assert after.spare_bytes_per_s == capacity
        assert after.total_queued_bytes == 0

    def test_to_proto(self) -> None:
        async def main():
            sched = make_scheduler(8 * MIB, window_s=2.0)
            await sched.send(MIB, FG)
            await sched.send(MIB, PREFETCH)
            await sched.send(2 * MIB, PREWARM)
            waiting = asyncio.create_task(sched.send(MIB, FG))
            await asyncio.sleep(0)
            msg = sched.stats().to_proto()
            await waiting
            return msg

        msg = run_virtual(main())
        assert isinstance(msg, state_pb2.LinkStats)
        assert msg.capacity_bytes_per_s == 8 * MIB
        assert msg.window_s == 2.0
        assert msg.foreground_bytes_per_s == pytest.approx(MIB / 2.0)
        assert msg.prefetch_bytes_per_s == pytest.approx(MIB / 2.0)
        assert msg.prewarm_bytes_per_s == pytest.approx(MIB)
        assert msg.throughput_bytes_per_s == pytest.approx(4 * MIB / 2.0)
        assert msg.spare_bytes_per_s == pytest.approx(8 * MIB - MIB / 2.0)
        assert msg.queued_bytes == MIB and msg.queued_foreground_bytes == MIB


class TestValidation:
    @pytest.mark.parametrize("capacity", [0.0, -1.0, float("inf"), float("nan")])
    def test_bad_capacity(self, capacity: float) -> None:
        with pytest.raises(ValueError, match="capacity_bytes_per_s"):
            LinkScheduler(capacity)
        sched = LinkScheduler(1e6)
        with pytest.raises(ValueError, match="capacity_bytes_per_s"):
            sched.set_capacity(capacity)
        assert sched.capacity_bytes_per_s == 1e6

    def test_bad_weights_and_burst(self) -> None:
        with pytest.raises(ValueError, match="FOREGROUND_KV"):
            LinkScheduler(1e6, class_weights={FG: 1.0})
        with pytest.raises(ValueError, match="PREWARM_WEIGHTS"):
            LinkScheduler(1e6, class_weights={PREWARM: 0.0})
        with pytest.raises(ValueError, match="burst_bytes"):
            LinkScheduler(1e6, burst_bytes=0)
        with pytest.raises(ValueError, match="window_s"):
            LinkScheduler(1e6, window_s=0.0)
        sched = LinkScheduler(1e6, class_weights={PREWARM: 4.0})
        assert dict(sched.class_weights) == {PREFETCH: 1.0, PREWARM: 4.0}

    def test_bad_send_arguments_queue_nothing(self) -> None:
        async def main():
            sched = make_scheduler()
            for args, match in [
                ((0, PREWARM), "nbytes"),
                ((MIB, 7), "TrafficClass"),
                ((MIB, PREWARM, float("nan")), "deadline_unix_s"),
            ]:
                with pytest.raises(ValueError, match=match):
                    await sched.send(*args)
            with pytest.raises(TypeError):
                await sched.send(1.5, PREWARM)
            return sched.stats()

        stats = run_virtual(main())
        assert stats.total_queued_bytes == 0
        assert sum(stats.granted_bytes_total.values()) == 0

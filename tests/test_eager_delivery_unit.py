"""Faust's fetch loop delivering records in place (streams.guards.deliver_eagerly), against mode's own
``Service.wait_first``: what finishes at once skips it, what blocks goes through it unchanged."""

from __future__ import annotations

import asyncio
import gc
import warnings

import mode

from kafka_backup.streams.guards import deliver_eagerly


class Consumer(mode.Service):
    """What the patch touches of Faust's consumer: mode's ``wait_first`` and the flow suspension event."""

    def __init__(self) -> None:
        super().__init__()
        self.app = type("App", (), {"rebalancing": False})()  # set by the consumer thread's rebalance listener
        self.suspend_flow = asyncio.Event()
        self.raced = 0
        race = self.wait_first

        async def counting(*coros, timeout=None):
            self.raced += 1
            return await race(*coros, timeout=timeout)

        self.wait_first = counting
        deliver_eagerly(self)


def run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_a_delivery_that_does_not_block_runs_in_place_and_leaves_no_coroutine_behind():
    async def main():
        consumer = Consumer()
        queue: asyncio.Queue = asyncio.Queue()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "coroutine ... was never awaited" would be an error
            for n in range(3):
                await consumer.wait_first(queue.put(n), consumer.suspend_flow.wait())
            gc.collect()
        return consumer.raced, [queue.get_nowait() for _ in range(3)]

    assert run(main()) == (0, [0, 1, 2])


def test_a_blocked_delivery_goes_on_through_wait_first_from_where_it_stopped():
    async def main():
        consumer = Consumer()
        queue: asyncio.Queue = asyncio.Queue(maxsize=1)
        queue.put_nowait("full")
        steps = []

        async def deliver(item):
            steps.append(f"start {item}")
            await queue.put(item)  # blocks: the queue is full
            steps.append(f"put {item}")
            return item

        async def drain_later():
            await asyncio.sleep(0.01)
            steps.append(f"got {queue.get_nowait()}")

        drainer = asyncio.ensure_future(drain_later())
        result = await consumer.wait_first(deliver("x"), consumer.suspend_flow.wait())
        await drainer
        return consumer.raced, steps, result.results, queue.get_nowait()

    raced, steps, results, left = run(main())
    assert (raced, steps, results, left) == (1, ["start x", "got full", "put x"], ["x"], "x")


def test_a_suspended_flow_abandons_a_blocked_delivery_as_faust_does():
    async def main():
        consumer = Consumer()
        queue: asyncio.Queue = asyncio.Queue(maxsize=1)
        queue.put_nowait("full")
        seen = []

        async def deliver(item):
            try:
                await queue.put(item)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
            seen.append("put")

        async def suspend_later():
            await asyncio.sleep(0.01)
            consumer.suspend_flow.set()

        suspender = asyncio.ensure_future(suspend_later())
        result = await consumer.wait_first(deliver("x"), consumer.suspend_flow.wait())
        await suspender
        await asyncio.sleep(0)  # the abandoned delivery's cancellation runs
        return consumer.raced, result.results, seen, queue.qsize()

    assert run(main()) == (1, [True], ["cancelled"], 1)


def test_with_the_flow_suspended_faust_s_own_race_runs():
    async def main():
        consumer = Consumer()
        consumer.suspend_flow.set()
        queue: asyncio.Queue = asyncio.Queue()
        await consumer.wait_first(queue.put(1), consumer.suspend_flow.wait())
        return consumer.raced

    assert run(main()) == 1


def test_an_error_in_the_delivery_is_raised_as_wait_first_would():
    async def main():
        consumer = Consumer()

        async def broken():
            raise ValueError("bad record")

        try:
            await consumer.wait_first(broken(), consumer.suspend_flow.wait())
        except ValueError as err:
            return str(err), consumer.raced
        return None

    assert run(main()) == ("bad record", 0)


def test_from_the_start_of_a_rebalance_faust_s_own_race_runs():
    """The consumer thread marks the rebalance at once; the flow is suspended only when the loop gets
    to run the revocation: in between, every delivery must yield to the loop as Faust's own does."""

    async def main():
        consumer = Consumer()
        queue: asyncio.Queue = asyncio.Queue()
        await consumer.wait_first(queue.put(1), consumer.suspend_flow.wait())
        consumer.app.rebalancing = True
        await consumer.wait_first(queue.put(2), consumer.suspend_flow.wait())
        consumer.app.rebalancing = False  # assigned and recovered: in place again
        await consumer.wait_first(queue.put(3), consumer.suspend_flow.wait())
        return consumer.raced, [queue.get_nowait() for _ in range(3)]

    assert run(main()) == (1, [1, 2, 3])

"""The scheduler's failover metrics on a real nats-server: dispatch retries, failover attempts by
kind and circuit-breaker state per engine (counts only, never timings)."""

from __future__ import annotations


from prometheus_client import generate_latest

from services.scheduler.circuit import CircuitState
from tests.scheduler.test_scheduler_harness import (count, engines, eventually, known, new_request,  # noqa: F401
                                          start_scheduler, submit)


def sample(scheduler, name: str, **labels: str) -> float | None:
    return scheduler.metrics.registry.get_sample_value(name, labels)


def circuit(scheduler, worker: str) -> str | None:
    """The state whose ``llm_scheduler_circuit_state`` sample is 1 for ``worker``."""
    on = [s.value for s in CircuitState if sample(scheduler, "llm_scheduler_circuit_state", worker=worker,
                                                  state=s.value) == 1.0]
    assert len(on) <= 1, on
    return on[0] if on else None


async def test_a_busy_answer_counts_one_retry_and_a_plain_dispatch_none(nc, start_scheduler, engines):
    liar = await engines("liar", slots=8)  # advertises free slots, answers busy
    liar.busy = True
    spare = await engines("spare", slots=2)
    async with start_scheduler() as scheduler:
        await known(scheduler, liar, spare)
        req = await submit(nc, new_request())
        await eventually(lambda: spare.received_ids == [req.id], what="the retry on the spare engine")
        await eventually(lambda: count(scheduler, "dispatched") == 1)
        assert sample(scheduler, "llm_scheduler_dispatch_retries_total") == 1
        liar.busy = False
        plain = await submit(nc, new_request())
        await eventually(lambda: plain.id in liar.received_ids + spare.received_ids, what="a first-choice dispatch")
        await eventually(lambda: count(scheduler, "dispatched") == 2)
        assert sample(scheduler, "llm_scheduler_dispatch_retries_total") == 1


async def test_failover_attempts_are_counted_by_kind(nc, start_scheduler, engines):
    engine = await engines("e1", slots=8)
    async with start_scheduler() as scheduler:
        await known(scheduler, engine)
        first = await submit(nc, new_request())
        redispatch = await submit(nc, new_request(id=f"{first.id}-r1", attempt=1))
        migration = await submit(nc, new_request(id=f"{first.id}-r2", attempt=2, continuation="tok1 tok2 "))
        await eventually(lambda: len(engine.received) == 3, what="all three dispatches")
        await eventually(lambda: count(scheduler, "dispatched") == 3)
        assert sample(scheduler, "llm_scheduler_failover_dispatches_total", kind="redispatch") == 1
        assert sample(scheduler, "llm_scheduler_failover_dispatches_total", kind="migration") == 1
        assert engine.received_ids == [first.id, redispatch.id, migration.id]


async def test_circuit_state_per_engine_follows_the_breaker(nc, start_scheduler, engines):
    hung = await engines("hung", slots=8, in_flight=0)  # least loaded: the first choice while allowed
    steady = await engines("steady", slots=8, in_flight=2)
    hung.silent = True
    async with start_scheduler(circuit_failures=2, circuit_cooldown=0.6, dispatch_timeout=0.2) as scheduler:
        await known(scheduler, hung, steady)
        assert circuit(scheduler, hung.worker) == circuit(scheduler, steady.worker) == "closed"
        for n in (1, 2):
            req = await submit(nc, new_request())
            await eventually(lambda req=req: req.id in steady.received_ids, what=f"request {n} to fail over")
        await eventually(lambda: circuit(scheduler, hung.worker) == "open", what="the circuit to open")
        assert circuit(scheduler, steady.worker) == "closed"
        assert sample(scheduler, "llm_scheduler_dispatch_retries_total") == 2
        assert sample(scheduler, "llm_scheduler_dispatch_attempts_total", result="no_reply") == 2
        # The cooldown: half-open by the clock, with no event in between (read from the exported metric).
        await eventually(lambda: circuit(scheduler, hung.worker) == "half_open", what="the cooldown to pass")
        hung.silent = False
        probe = await submit(nc, new_request())
        await eventually(lambda: probe.id in hung.received_ids, what="the half-open probe")
        await eventually(lambda: circuit(scheduler, hung.worker) == "closed", what="the probe to close it")
        text = generate_latest(scheduler.metrics.registry).decode()
        assert f'llm_scheduler_circuit_state{{state="closed",worker="{hung.worker}"}} 1.0' in text

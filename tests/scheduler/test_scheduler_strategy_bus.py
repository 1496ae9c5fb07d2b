"""Run-time strategy switching through KV and per-engine circuit breakers, on a real nats-server."""

from __future__ import annotations

import json

from schemas import names
from services.scheduler.circuit import CircuitState
from services.scheduler.strategies import Strategy
from services.scheduler.status import STATUS_SUBJECT
from tests.scheduler.test_scheduler_harness import (engines, eventually, known, new_request, start_scheduler,  # noqa: F401
                                          submit)


async def test_a_strategy_put_in_kv_switches_routing_on_every_running_replica(nc, js, start_scheduler, engines,
                                                                             caplog):
    light = await engines("light", slots=8, in_flight=0)
    loaded = await engines("loaded", slots=8, in_flight=6)
    kv = await js.key_value(names.SCHEDULER_CONFIG_BUCKET)
    async with start_scheduler() as s1, start_scheduler() as s2:
        await known(s1, light, loaded)
        await known(s2, light, loaded)
        first = [await submit(nc, new_request()) for _ in range(3)]
        await eventually(lambda: len(light.received) == 3, what="least_connections to fill the light engine")
        assert loaded.dispatch_requests == 0 and sorted(light.received_ids) == sorted(r.id for r in first)

        await kv.put(names.STRATEGY_KEY, b"round_robin")
        await eventually(lambda: s1.placement.strategy is s2.placement.strategy is Strategy.ROUND_ROBIN,
                         what="both replicas to switch to round_robin")
        status = json.loads((await nc.request(STATUS_SUBJECT, b"", timeout=2)).data)
        assert status["strategy"] == "round_robin"  # what `nats req cy-scheduler.status ''` shows operators
        for _ in range(4):
            await submit(nc, new_request())
        await eventually(lambda: len(light.received) + len(loaded.received) == 7, what="four more dispatches")
        assert len(loaded.received) >= 1, "round robin never chose the loaded engine"

        await kv.put(names.STRATEGY_KEY, b"fastest-please")  # unknown: logged and ignored
        await eventually(lambda: caplog.text.count("ignoring unknown routing strategy b'fastest-please'") == 2,
                         what="both replicas to read the unknown strategy")
        assert s1.placement.strategy is s2.placement.strategy is Strategy.ROUND_ROBIN

        await kv.delete(names.STRATEGY_KEY)  # back to the configured strategy
        await eventually(lambda: s1.placement.strategy is s2.placement.strategy is Strategy.LEAST_CONNECTIONS,
                         what="both replicas to return to least_connections")


async def test_a_replica_starting_later_applies_the_stored_strategy(nc, js, start_scheduler):
    kv = await js.key_value(names.SCHEDULER_CONFIG_BUCKET)
    await kv.put(names.STRATEGY_KEY, b"prefix_affinity")
    async with start_scheduler(strategy="weighted") as scheduler:
        await eventually(lambda: scheduler.placement.strategy is Strategy.PREFIX_AFFINITY,
                         what="the stored strategy to win over the configured one")


def circuits_open(scheduler) -> float | None:
    return scheduler.metrics.registry.get_sample_value("llm_scheduler_circuits_open")


async def test_circuit_opens_on_an_unanswering_engine_and_a_half_open_probe_closes_it(nc, start_scheduler,
                                                                                     engines):
    hung = await engines("hung", slots=8, in_flight=0)  # least loaded: always first choice while allowed
    steady = await engines("steady", slots=8, in_flight=2)
    hung.silent = True
    async with start_scheduler(circuit_failures=2, circuit_cooldown=0.6, dispatch_timeout=0.2) as scheduler:
        await known(scheduler, hung, steady)
        for n in (1, 2):
            req = await submit(nc, new_request())
            await eventually(lambda req=req: req.id in steady.received_ids, what=f"request {n} to fail over")
        assert hung.dispatch_requests == 2
        await eventually(lambda: circuits_open(scheduler) == 1, what="the circuit to open")

        req = await submit(nc, new_request())
        await eventually(lambda: req.id in steady.received_ids, what="a dispatch while the circuit is open")
        assert hung.dispatch_requests == 2, "an engine with an open circuit was sent work"

        hung.silent = False
        await eventually(lambda: scheduler.placement.breakers.state(hung.worker) is CircuitState.HALF_OPEN,
                         what="the cooldown: the breaker half-opens")
        probe = await submit(nc, new_request())
        await eventually(lambda: hung.received_ids == [probe.id], what="the half-open probe to reach the engine")
        await eventually(lambda: circuits_open(scheduler) == 0, what="the probe's success to close the circuit")
        after = await submit(nc, new_request())
        await eventually(lambda: after.id in hung.received_ids, what="work to flow to the recovered engine")

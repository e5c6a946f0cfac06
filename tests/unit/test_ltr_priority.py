"""`--schedule-policy ltr` and priority scheduling on the model-free rig (fake_runtime.py): the order they admit
in, the starvation guard that bounds every wait, and preemption for priority that leaves every output as an
unpreempted run's."""

from __future__ import annotations

import time

import pytest

from radixflow.runtime.request import FinishReason
from tests.unit.fake_runtime import Rig, expected_tokens, tokens


def score_by_first_token(ids) -> float:
    """A stand-in ranker: the prompt's first token is its predicted length."""
    return float(ids[0])


def test_ltr_admits_the_shortest_predicted_output_first():
    rig = Rig(schedule_policy="ltr", max_running_requests=1, length_scorer=score_by_first_token)
    rig.add("long", tokens(900, 5), arrival=0.0)
    rig.add("short", tokens(100, 5), arrival=1.0)
    rig.add("mid_late", tokens(500, 5), arrival=3.0)
    rig.add("mid", tokens(500, 6), arrival=2.0)
    rig.run()
    assert rig.admission_order(["long", "short", "mid", "mid_late"]) == ["short", "mid", "mid_late", "long"]
    assert rig.reqs["long"].length_score == 900.0


def test_ltr_needs_a_ranker():
    with pytest.raises(ValueError, match="ltr needs an output-length ranker"):
        Rig(schedule_policy="ltr")


def test_the_starvation_guard_bounds_the_wait_of_a_long_predicted_request():
    timeout = 0.05
    rig = Rig(schedule_policy="ltr", max_running_requests=1, starvation_timeout_s=timeout,
              length_scorer=score_by_first_token)
    long_req = rig.add("long", tokens(5000, 5), max_new_tokens=1)
    for i in range(400):  # a stream of shorter requests, one new each step, would pass it over forever
        rig.add(f"short{i}", tokens(100 + 10 * i, 5), max_new_tokens=1)
        rig.step()
        if "long" in rig.admission_step:
            break
        time.sleep(0.002)
    assert "long" in rig.admission_step
    waited = time.monotonic() - long_req.arrival
    assert waited < timeout + 0.5  # admitted at the first step after it starved
    assert rig.admission_step["long"] > 0  # and not before: ltr did pass it over


def test_priority_orders_before_the_policy_lower_values_first():
    rig = Rig(schedule_policy="fcfs", enable_priority_scheduling=True, max_running_requests=1)
    rig.add("p5_first", tokens(100, 5), priority=5, arrival=0.0)
    rig.add("p1", tokens(200, 5), priority=1, arrival=1.0)
    rig.add("p5_second", tokens(300, 5), priority=5, arrival=2.0)
    rig.add("p0", tokens(400, 5), priority=0, arrival=3.0)
    rig.step()  # the first admission happens before the rest are compared
    rig.run()
    assert rig.admission_order(["p5_first", "p1", "p5_second", "p0"]) == ["p0", "p1", "p5_first", "p5_second"]


def test_without_priority_scheduling_priority_is_ignored():
    rig = Rig(schedule_policy="fcfs", max_running_requests=1)
    rig.add("a", tokens(100, 5), priority=9, arrival=0.0)
    rig.add("b", tokens(200, 5), priority=0, arrival=1.0)
    rig.run()
    assert rig.admission_order(["a", "b"]) == ["a", "b"]


def run_with_late_urgent_request(**options) -> Rig:
    """Two low-priority requests decoding when a high-priority one arrives and finds no room."""
    rig = Rig(schedule_policy="priority", **options)
    rig.add("low_a", tokens(100, 8), max_new_tokens=40, priority=10)
    rig.add("low_b", tokens(200, 8), max_new_tokens=40, priority=10)
    for _ in range(5):
        rig.step()
    rig.add("urgent", tokens(300, 8), max_new_tokens=6, priority=0)
    rig.run()
    return rig


@pytest.mark.parametrize("room", [{"max_running_requests": 2},  # no request slot free
                                  {"pool_size": 60, "new_token_ratio": 0.5, "min_new_token_ratio": 0.5}])  # no KV
def test_a_higher_priority_request_preempts_and_every_output_is_unchanged(room):
    rig = run_with_late_urgent_request(**room)
    assert rig.scheduler.stats.num_priority_preemptions == 1
    assert rig.admission_step["urgent"] == 5  # admitted the step it arrived
    finished_at = {rid: max(i for i, _ in rig.chunks_of(rid)) for rid in ("urgent", "low_a", "low_b")}
    assert finished_at["urgent"] < min(finished_at["low_a"], finished_at["low_b"])
    for rid, n in (("low_a", 40), ("low_b", 40), ("urgent", 6)):
        assert rig.tokens[rid] == expected_tokens(rid, n)  # what an unpreempted run produces
        assert rig.finish[rid] == FinishReason("length")


def test_equal_priority_does_not_preempt():
    rig = Rig(schedule_policy="priority", max_running_requests=2)
    rig.add("a", tokens(100, 8), max_new_tokens=20, priority=3)
    rig.add("b", tokens(200, 8), max_new_tokens=20, priority=3)
    rig.step()
    rig.add("c", tokens(300, 8), max_new_tokens=4, priority=3)
    rig.run()
    assert rig.scheduler.stats.num_priority_preemptions == rig.scheduler.stats.num_retractions == 0


def test_a_request_admitted_by_the_starvation_guard_is_not_preempted_for_priority():
    rig = Rig(schedule_policy="priority", max_running_requests=1, starvation_timeout_s=0.05)
    rig.add("old_low", tokens(100, 8), max_new_tokens=20, priority=10, arrival=-1.0)
    rig.step()
    rig.add("urgent", tokens(200, 8), max_new_tokens=4, priority=0)
    rig.run()
    assert rig.scheduler.stats.num_priority_preemptions == 0
    assert rig.admission_order(["old_low", "urgent"]) == ["old_low", "urgent"]

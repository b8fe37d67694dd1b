"""Each rule of the replica recommender, fed synthetic load: no processes, no clock."""

from __future__ import annotations

from kiln.control.autoscaler import Policy, Recommender

FAST = {"downscale_stabilization_s": 0, "upscale_stabilization_s": 0}


def rec(policy: Policy, **kw) -> Recommender:
    return Recommender(policy, started_at=kw.pop("started_at", -1e9))


def test_replicas_follow_in_flight_over_target() -> None:
    r = rec(
        Policy(
            target_replica_concurrency=2, max_upscale_factor=10, max_downscale_factor=0.1, **FAST
        )
    )
    assert r.recommend(0, current=2, avg_in_flight=10).replicas == 5
    assert r.recommend(1, current=5, avg_in_flight=4).replicas == 2


def test_tolerance_band_keeps_the_current_count() -> None:
    r = rec(Policy(target_replica_concurrency=1, upscale_tolerance=0.1, **FAST))
    decision = r.recommend(0, current=10, avg_in_flight=10.9)
    assert decision.replicas == 10 and "tolerance" in decision.reason
    assert r.recommend(1, current=10, avg_in_flight=11.5).replicas == 12


def test_upscale_factor_caps_a_jump_but_plus_one_is_always_allowed() -> None:
    r = rec(Policy(max_upscale_factor=1.5, **FAST))
    assert r.recommend(0, current=4, avg_in_flight=100).replicas == 6  # ceil(4 * 1.5)
    assert r.recommend(1, current=1, avg_in_flight=100).replicas == 2  # +1 beats ceil(1.5)=2


def test_downscale_factor_caps_a_drop_but_minus_one_is_always_allowed() -> None:
    r = rec(Policy(max_downscale_factor=0.75, **FAST))
    assert r.recommend(0, current=8, avg_in_flight=0.5).replicas == 6  # ceil(8 * .75)
    assert r.recommend(1, current=2, avg_in_flight=0.1).replicas == 1  # -1 allowed


def test_min_and_max_replicas_clamp() -> None:
    r = rec(Policy(min_replicas=3, max_replicas=5, max_upscale_factor=100, **FAST))
    assert r.recommend(0, current=4, avg_in_flight=0).replicas == 3
    assert r.recommend(1, current=4, avg_in_flight=1000).replicas == 5


def test_downscale_stabilization_keeps_the_highest_recent_recommendation() -> None:
    p = Policy(downscale_stabilization_s=60, upscale_stabilization_s=0, max_upscale_factor=10)
    r = rec(p)
    assert r.recommend(0, current=2, avg_in_flight=8).replicas == 8
    assert r.recommend(30, current=8, avg_in_flight=1).replicas == 8  # 8 seen 30 s ago
    assert r.recommend(61, current=8, avg_in_flight=1).replicas == 6  # window passed; factor cap


def test_upscale_stabilization_keeps_the_lowest_recent_recommendation() -> None:
    p = Policy(upscale_stabilization_s=60, downscale_stabilization_s=0, max_upscale_factor=10)
    r = rec(p)
    assert r.recommend(0, current=2, avg_in_flight=2).replicas == 2
    assert r.recommend(30, current=2, avg_in_flight=9).replicas == 2  # 2 seen 30 s ago
    assert r.recommend(61, current=2, avg_in_flight=9).replicas == 9


def test_no_moves_until_a_full_stabilization_period_has_run() -> None:
    p = Policy(downscale_stabilization_s=100, upscale_stabilization_s=50, max_upscale_factor=10)
    r = Recommender(p, started_at=0)
    assert r.recommend(10, current=2, avg_in_flight=9).replicas == 2
    assert r.recommend(20, current=2, avg_in_flight=0).replicas == 2


def test_cpu_target_is_a_floor_for_the_concurrency_count() -> None:
    r = rec(Policy(target_cpu_utilization=80, max_upscale_factor=10, **FAST))
    decision = r.recommend(0, current=2, avg_in_flight=1, cpu_utilization=160)
    assert decision.replicas == 4 and "cpu" in decision.reason


def test_scale_to_zero_after_idle_timeout_and_back_on_demand() -> None:
    r = rec(Policy(min_replicas=0, idle_timeout_s=30, **FAST))
    assert r.recommend(0, current=1, avg_in_flight=0, idle_for=10).replicas == 1
    zero = r.recommend(1, current=1, avg_in_flight=0, idle_for=31)
    assert zero.replicas == 0 and "idle_timeout" in zero.reason
    assert r.recommend(2, current=0, avg_in_flight=0).replicas == 0
    assert r.recommend(3, current=0, avg_in_flight=1).replicas == 1


def test_without_min_zero_an_idle_api_keeps_one_replica() -> None:
    r = rec(Policy(min_replicas=1, idle_timeout_s=30, **FAST))
    assert r.recommend(0, current=1, avg_in_flight=0, idle_for=1000).replicas == 1


def test_cpu_over_target_scales_up_even_when_concurrency_is_within_tolerance() -> None:
    """The tolerance band applies to the signal that decided: one request in flight
    against a target of one is on target, but 100% CPU against 50% is not."""
    r = rec(Policy(target_replica_concurrency=1, target_cpu_utilization=50, **FAST))
    decision = r.recommend(0, current=1, avg_in_flight=1, cpu_utilization=100)
    assert decision.replicas == 2, decision
    assert decision.reason == "cpu 100% against target 50%"
    assert r.recommend(1, current=2, avg_in_flight=2, cpu_utilization=51).replicas == 2

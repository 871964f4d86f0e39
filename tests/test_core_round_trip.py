"""benchmarks/core_round_trip.py: the probe that says where the host put the CPUs a benchmark ran on."""

import os

import pytest

from benchmarks import core_round_trip

TWO_CPUS = sorted(os.sched_getaffinity(0))[:2]


@pytest.mark.skipif(len(TWO_CPUS) < 2, reason="the probe needs two CPUs this process may run on")
def test_round_trips_are_measured_and_the_caller_is_unpinned_after():
    before = os.sched_getaffinity(0)
    samples = core_round_trip.round_trips(0.7, cpus=tuple(TWO_CPUS), gap=0.1, trips=2000)
    assert len(samples) >= 2
    # A round trip is two cache-line transfers: more than a nanosecond, less than a millisecond.
    assert all(1.0 < s < 1e6 for s in samples), samples
    assert os.sched_getaffinity(0) == before


def test_bad_cpus_are_refused():
    with pytest.raises(ValueError, match="two different CPUs"):
        core_round_trip.round_trips(0.1, cpus=(0, 0))
    with pytest.raises(ValueError, match="two different CPUs"):
        core_round_trip.round_trips(0.1, cpus=(0, 10_000))


def test_placement_shares():
    shares = core_round_trip.placement_shares([28.0, 64.0, 66.0, 330.0])
    assert shares == {"one physical core": 0.25, "one L3": 0.5, "apart": 0.25}

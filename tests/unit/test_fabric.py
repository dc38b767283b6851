"""The simulated fabric (parallel/fabric.py): config errors name the key, the link-time arithmetic, and a
LinkDelay that lasts its modelled time from creation, minus whatever time already passed."""

from __future__ import annotations

import time

import pytest

from model import ConfigError
from parallel.config import ParallelConfig
from parallel.fabric import Fabric, LinkDelay


def test_link_time_is_latency_plus_the_slower_kind_of_link():
    fabric = Fabric(intra_gbps=160, inter_gbps=50, latency_us=5)
    assert fabric.seconds(0, 0) == 0.0
    assert fabric.seconds(160e6, 0) == pytest.approx(5e-6 + 1e-3)
    assert fabric.seconds(160e6, 100e6) == pytest.approx(5e-6 + 2e-3)  # 100 MB over 50 GB/s dominates
    assert Fabric.from_config(None) is None
    assert Fabric.from_config({"intra_gbps": 160, "inter_gbps": 50}) == Fabric(160.0, 50.0, 0.0)


@pytest.mark.parametrize("values,words", [
    ({"intra_gbps": 160}, r"missing \['inter_gbps'\]"),
    ({"intra_gbps": 160, "inter_gbps": 50, "speed": 1}, r"unknown keys \['speed'\]"),
    ({"intra_gbps": 0, "inter_gbps": 50}, r"parallel.fabric.intra_gbps=0: must be a positive number"),
    ({"intra_gbps": 160, "inter_gbps": 50, "latency_us": -1}, r"latency_us=-1: must be a positive number \(or 0\)"),
])
def test_bad_fabric_names_the_key(values, words):
    with pytest.raises(ConfigError, match=words):
        ParallelConfig(fabric=values).validate(1)


def test_link_delay_counts_from_its_creation():
    delay = LinkDelay(0.05)
    assert not delay.is_completed()
    time.sleep(0.03)  # "compute" while the exchange is in flight
    t0 = time.perf_counter()
    delay.wait()
    waited = time.perf_counter() - t0
    assert 0.005 < waited < 0.045 and delay.is_completed()  # only the rest of the 50 ms is exposed
    t0 = time.perf_counter()
    delay.wait()
    assert time.perf_counter() - t0 < 0.005

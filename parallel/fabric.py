"""A simulated network for CPU runs (issue 5): link bandwidth and latency inside a simulated node (the paper's
NVLink, 160 GB/s) and across nodes (InfiniBand, 50 GB/s), so that communication takes the time it would on the
cluster and overlapping it with compute becomes real and measurable on one CPU machine.

gloo on localhost moves bytes in microseconds, so an exchange would hide behind any computation. With a
`Fabric` an exchange completes no earlier than its modelled duration after it started: each expert all-to-all
(forward and backward, flat or hierarchical, per stage) and each pipeline receive gets a `LinkDelay` next to its
gloo works, and waiting on it sleeps whatever of the modelled time has not yet passed. Time spent computing
meanwhile is hidden; time spent waiting is exposed, exactly as on the real fabric.

Modelled duration of one exchange from a rank: latency + max(intra-node bytes / intra bandwidth, cross-node
bytes / cross bandwidth) (the two kinds of links work in parallel). Pipeline receives are timed from when they
are posted, since the sender's time is not known to the receiver.

Config: `parallel.fabric` is null (off) or a mapping of this file's `Fabric` fields, e.g.
`parallel.fabric={intra_gbps: 160, inter_gbps: 50, latency_us: 5}`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from core.config import Config, ConfigError, from_dict


@dataclass(frozen=True)
class Fabric(Config):
    """The simulated links (the `parallel.fabric` config group's value)."""

    prefix = "parallel.fabric"

    intra_gbps: float  # GB/s (1e9 bytes) per rank to ranks of its own (simulated) node: the paper's NVLink, 160
    inter_gbps: float  # GB/s per rank to ranks of other nodes: the paper's InfiniBand, 50
    latency_us: float = 0.0  # microseconds added to every exchange

    def __post_init__(self) -> None:
        for key in ("intra_gbps", "inter_gbps", "latency_us"):
            value = getattr(self, key)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or value < 0 or (key != "latency_us" and value == 0):
                raise ConfigError(f"parallel.fabric.{key}={f'{value:g}' if number else repr(value)}: must be a "
                                  "positive number"
                                  + (" (or 0)" if key == "latency_us" else ""))

    @classmethod
    def from_config(cls, values: Any) -> Fabric | None:
        """None for null (no simulated fabric), a Fabric as it is, or one from a mapping of its fields."""
        if values is None or isinstance(values, Fabric):
            return values
        return from_dict(cls, values, cls.prefix)

    def seconds(self, intra_bytes: int, inter_bytes: int) -> float:
        """Modelled duration of one exchange that sends these bytes from one rank."""
        if intra_bytes == 0 and inter_bytes == 0:
            return 0.0
        transfer = max(intra_bytes / (self.intra_gbps * 1e9), inter_bytes / (self.inter_gbps * 1e9))
        return self.latency_us * 1e-6 + transfer


class LinkDelay:
    """Stands next to an exchange's gloo works: `wait()` returns once its modelled duration has passed since the
    exchange started (immediately if it already has)."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.perf_counter() + seconds

    def wait(self) -> bool:
        remaining = self.deadline - time.perf_counter()
        if remaining > 0:
            time.sleep(remaining)
        return True

    def is_completed(self) -> bool:
        return time.perf_counter() >= self.deadline

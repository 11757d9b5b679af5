"""Where lost messages were lost: on the device, or between the broker and this subscriber.

A seq gap alone cannot say. Three signals can:
* the device says so: `outbox_dropped` on the next message it delivers (device-side loss);
* the broker says so: mosquitto's `$SYS/broker/publish/messages/dropped` (queue limits),
  subscribed to when the ACL allows;
* our own session says so: when gaps open on many devices within the same 5 s of *arrival*,
  devices that are independent of each other did not all lose messages at once -- our session
  did (a subscriber queue overflow, a broker restart without persistence). A burst is at least
  `min_devices` devices and `share` of the devices heard from in that interval opening gaps.

Gaps that are neither device-reported nor in a burst stay "unattributed" (a replay still
running, or loss on one device's link). Pure: fed by FleetState, clock injected.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SessionLoss:
    """Counts gap openings per arrival interval (`window_s`) and classifies bursts as
    session-side loss."""

    min_devices: int = 3
    share: float = 0.5
    window_s: float = 5.0
    bursts: int = 0                  # intervals judged to be session-side loss
    session_missing: int = 0         # seq numbers missing in gaps opened during bursts
    _second: float | None = None
    _heard: set[str] = field(default_factory=set)
    _opened: dict[str, int] = field(default_factory=dict)   # device -> seqs missing

    def seen(self, now: float, device: str, opened_gap: int) -> None:
        """One message arrived from `device`; it opened a gap of `opened_gap` seqs (0: none)."""
        second = now // self.window_s
        if second != self._second:
            self.close()
            self._second = second
        self._heard.add(device)
        if opened_gap > 0:
            self._opened[device] = self._opened.get(device, 0) + opened_gap

    def _burst(self) -> bool:
        n = len(self._opened)
        return n >= self.min_devices and n >= self.share * len(self._heard)

    def close(self) -> None:
        """Judge the interval just ended."""
        if self._burst():
            self.bursts += 1
            self.session_missing += sum(self._opened.values())
        self._heard = set()
        self._opened = {}

    def totals(self) -> tuple[int, int]:
        """(bursts, session_missing) including the interval in progress, without closing it."""
        if self._burst():
            return self.bursts + 1, self.session_missing + sum(self._opened.values())
        return self.bursts, self.session_missing

"""The aggregator process around the fold: its recovery watchdog."""

from __future__ import annotations


def test_recovery_watchdog_restarts_only_a_stalled_recovery():
    import threading
    import time
    from collections import Counter
    from types import SimpleNamespace

    from streams.app import recovery_watchdog

    def fake_app(offsets):
        return SimpleNamespace(in_recovery=True, tables=SimpleNamespace(recovery=SimpleNamespace(
            active_offsets=offsets, standby_offsets=Counter())))

    stalled, restarted = fake_app(Counter({"tp0": 5})), threading.Event()
    recovery_watchdog(stalled, stall_s=0.3, restart=restarted.set, interval_s=0.05)
    assert restarted.wait(3)

    moving, restarted_too = fake_app(Counter({"tp0": 0})), threading.Event()
    recovery_watchdog(moving, stall_s=0.3, restart=restarted_too.set, interval_s=0.05)
    for i in range(20):  # a long recovery that keeps reading the changelog
        moving.tables.recovery.active_offsets["tp0"] = i
        time.sleep(0.05)
    moving.in_recovery = False
    assert not restarted_too.wait(0.5)

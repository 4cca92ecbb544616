"""Preemption: SIGTERM / SIGINT only set a flag; the loop reads it once per step, agreed across ranks.

    with StopRequest() as stop:
        ... if stop.flag (agreed with the other ranks in the step's one all-reduce) -> checkpoint, exit 0
"""
from __future__ import annotations

import signal
import threading


class StopRequest:
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.flag = False
        self.signum = None
        self._old = {}

    def _handler(self, signum, frame):
        self.flag = True
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        return False

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "stop request"

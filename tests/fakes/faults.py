"""Fault injection shared by the CRM fakes: what to do to the next matching request."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field


@dataclass
class Fault:
    """What to do to the next request whose method and path match (`path_pattern`, a regex searched in the path)."""

    method: str
    path_pattern: str
    status: int | None = None  # answer this status without processing
    retry_after: int | None = None
    delay_after: float = 0.0  # process, then hold the answer this long (client times out)
    drop: bool = False  # process, then cut the connection in the middle of the answer


@dataclass
class FaultQueue:
    """Mixed into a fake: tests queue faults with `fail_next`, handlers take them with `take_fault`."""

    faults: list[Fault] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def fail_next(self, method: str, path_pattern: str, *, status: int | None = None, retry_after: int | None = None,
                  delay_after: float = 0.0, drop: bool = False, times: int = 1) -> None:
        for _ in range(times):
            self.faults.append(Fault(method, path_pattern, status, retry_after, delay_after, drop))

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.method == method and re.search(fault.path_pattern, path):
                    self.faults.remove(fault)
                    return fault
        return None

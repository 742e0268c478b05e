"""The benchmark clients' short scheduler slice: a client thread that is sent a token runs at once.

On a 2-core machine the servers' engines keep every core busy. A client thread that wakes up to read a token then
waits for a core: Linux's EEVDF scheduler (6.6+) lets the running thread finish its slice first (1.4 ms on 2
cores) unless the woken one asked for a shorter slice, which a normal thread may do since 6.12
(``sched_attr.sched_runtime``, 0.1-100 ms, no privilege needed). A benchmark's clients stand in for clients on other
machines, whose CPU the servers do not hold, so they ask for it (see ray_serve.py). Elsewhere (older kernels, other
systems, seccomp filters) asking does nothing.

The servers once asked for it too, for their event loops; paired against the same servers without it, it gained
nothing (one server: first token 1.05x, tok/s 0.98x; 16 and 64 clients 1.00x; the Ray path: 1.03x either way),
so only the clients here ask.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import sys

logger = logging.getLogger(__name__)

SHORT_SLICE_NS = 100_000  # the shortest slice Linux grants (0.1 ms)
# sched_setattr / sched_getattr by machine (the kernel's generic table for arm64)
SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}
FAIR_POLICIES = (0, 3, 5)  # SCHED_OTHER, SCHED_BATCH, SCHED_IDLE: the classes whose slice sched_runtime sets


class SchedAttr(ctypes.Structure):
    """The kernel's ``struct sched_attr`` (include/uapi/linux/sched/types.h, version 1: 56 bytes)."""

    _fields_ = [("size", ctypes.c_uint32), ("sched_policy", ctypes.c_uint32), ("sched_flags", ctypes.c_uint64),
                ("sched_nice", ctypes.c_int32), ("sched_priority", ctypes.c_uint32),
                ("sched_runtime", ctypes.c_uint64), ("sched_deadline", ctypes.c_uint64),
                ("sched_period", ctypes.c_uint64), ("sched_util_min", ctypes.c_uint32),
                ("sched_util_max", ctypes.c_uint32)]


def prefer_short_slice(slice_ns: int = SHORT_SLICE_NS) -> bool:
    """Ask for a ``slice_ns`` scheduler slice for the calling thread (threads and processes it starts later inherit
    it; 0 asks for the kernel's default again); its policy, niceness and the rest stay as they are. True if the
    kernel took the request (kernels before 6.12 take it and ignore it); False where it cannot be asked (not Linux,
    another machine, a real-time thread)."""
    attr = _get_attr()
    if attr is None or attr.sched_policy not in FAIR_POLICIES:
        return False
    attr.sched_runtime = slice_ns
    attr.sched_flags = 0
    setattr_nr = SYSCALLS[platform.machine()][0]
    if _libc().syscall(ctypes.c_long(setattr_nr), 0, ctypes.byref(attr), ctypes.c_uint(0)) != 0:
        logger.debug("sched_setattr refused a %d ns slice (errno %d)", slice_ns, ctypes.get_errno())
        return False
    return True


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _get_attr() -> SchedAttr | None:
    """The calling thread's scheduling attributes, or None where they cannot be read."""
    if not sys.platform.startswith("linux") or platform.machine() not in SYSCALLS:
        return None
    attr = SchedAttr()
    getattr_nr = SYSCALLS[platform.machine()][1]
    if _libc().syscall(ctypes.c_long(getattr_nr), ctypes.c_int(0), ctypes.byref(attr),
                       ctypes.c_uint(ctypes.sizeof(attr)), ctypes.c_uint(0)) != 0:
        return None
    attr.size = ctypes.sizeof(SchedAttr)
    return attr

"""Children of `univigu up` end when `up` ends, even when it is SIGKILLed and cannot stop them itself.

Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) has the kernel send the child SIGTERM, which
every child handles gracefully (the worker finishes its job, Redis writes its append-only file). The
signal follows the *thread* that started the child, so only `up`'s main thread may start children with
it. Elsewhere there is no such signal and children outlive a killed `up`, as before.
"""

from __future__ import annotations

import ctypes
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


# Looked up before any fork: the child between fork and exec runs only the call itself.
_PRCTL = _prctl()


def _terminate_with_parent() -> None:
    assert _PRCTL is not None
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def terminate_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen` (None where the platform has no such signal)."""
    return None if _PRCTL is None else _terminate_with_parent

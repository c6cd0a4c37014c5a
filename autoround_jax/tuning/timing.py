"""Where a block's time goes: I/O, float/quantized forwards, the tuning step, compilation, finalize.

Compile time comes from JAX's own compile events (tracing, lowering, backend compile), so it is taken out of the
phase that triggered it instead of hiding inside the first block's step.
"""

from __future__ import annotations

import time

import jax

from ..models.quantized import PHASES

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]


def _on_event(event: str, duration: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        _compile_seconds[0] += duration


jax.monitoring.register_event_duration_secs_listener(_on_event)


class BlockTimer:
    """lap(phase, *arrays) waits for the arrays, then charges the time since the last lap to the phase (less any
    compilation, which goes to 'compile')."""

    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._t = time.perf_counter()
        self._c = _compile_seconds[0]

    def lap(self, phase: str, *arrays) -> None:
        if arrays:
            jax.block_until_ready(arrays)
        now, compiled = time.perf_counter(), _compile_seconds[0]
        c = min(compiled - self._c, now - self._t)
        self.seconds["compile"] += c
        self.seconds[phase] += now - self._t - c
        self._t, self._c = now, compiled

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def peak_host_gb() -> float:
    """This process's peak resident memory in GB: /proc's VmHWM where it exists (getrusage's ru_maxrss also counts
    a forking parent's memory on Linux), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1e9

"""Fault injection for the crash-safety tests: kill this process at a named point of a run.

With ``CLIPREID_FAULT=NAME:N`` in the environment, the N-th time the code passes
``fault_point(NAME)`` the process sends itself SIGKILL (no handler, no cleanup: exactly what a
pre-empted or out-of-memory job suffers); ``NAME:N:TERM`` (or ``INT``) sends that signal instead,
as a scheduler's pre-emption notice or a Ctrl-C would. Points: ``write`` (a file's content is
written to its temporary name, not yet moved into place), ``step`` (an optimizer step is done),
``eval`` (an evaluation starts). Unset, a point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "CLIPREID_FAULT"
_passes: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Count a pass through the point ``name``; SIGKILL the process on the configured pass."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, count, *sig = spec.split(":")
    if target != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == int(count):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig[0] if sig else 'KILL'}"))

"""Compiled decode steps beside concurrent eager calls: a compile never overlaps an eager call.

While any thread compiles, torch holds one process-wide flag (``torch.compiler.is_compiling()``
is True in *every* thread, torch 2.13), and transformers and the ``kernels`` distribution take
their compile-only paths in every thread that reads it. The attention classes transformers 5.25
decorates with ``kernels``' ``use_kernelized_func`` (Llama, Qwen3, Mistral...) keep their
routing in a ``CompileableContextVar``, which then switches a module-wide variable under the
feet of eager calls in other threads: ``TypeError: expected an instance of Token`` in the eager
thread, or dynamo's "Guard failed on the same frame it was created" in the compiling one.

Neither class can be fixed from here, so the calls are kept apart instead: a ``generate()``
whose decode step may compile holds :data:`GATE` exclusively (it waits for the eager calls in
flight and holds off new ones until it returns); eager calls hold it shared and run side by
side as before. IAPT's own hooks read ``torch.compiler.is_dynamo_compiling()``, which is true
only in the frame dynamo traces, never the process-wide flag.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

__all__ = ["CompileGate", "GATE", "gate"]


class CompileGate:
    """A readers-writer gate: ``shared()`` blocks may overlap each other; an ``exclusive()``
    block overlaps nothing. A waiting exclusive holder is served before new shared ones (a
    stream of eager calls cannot starve a compiled one). Nested blocks in a thread that already
    holds the gate (a call made from inside another) pass straight through, and so does code
    that dynamo is tracing (a lock cannot enter a graph; the traced call's caller holds the gate
    if it is an IAPT call)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0  # exclusive holders waiting
        self._depth = threading.local()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._hold(exclusive=False):
            yield

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._hold(exclusive=True):
            yield

    @contextlib.contextmanager
    def _hold(self, exclusive: bool) -> Iterator[None]:
        depth = getattr(self._depth, "value", 0)
        if depth or torch.compiler.is_dynamo_compiling():
            yield
            return
        self._acquire(exclusive)
        self._depth.value = 1
        try:
            yield
        finally:
            self._depth.value = 0
            self._release(exclusive)

    def _acquire(self, exclusive: bool) -> None:
        with self._cond:
            if exclusive:
                self._waiting += 1
                try:
                    while self._exclusive or self._shared:
                        self._cond.wait()
                finally:
                    self._waiting -= 1
                self._exclusive = True
            else:
                while self._exclusive or self._waiting:
                    self._cond.wait()
                self._shared += 1

    def _release(self, exclusive: bool) -> None:
        with self._cond:
            if exclusive:
                self._exclusive = False
            else:
                self._shared -= 1
            self._cond.notify_all()


GATE = CompileGate()


def gate(exclusive: bool = False) -> contextlib.AbstractContextManager:
    """``GATE.exclusive()`` or ``GATE.shared()``; nothing in a frame dynamo traces (checked
    here, so the traced code never meets the gate's lock)."""
    if torch.compiler.is_dynamo_compiling():
        return contextlib.nullcontext()
    return GATE.exclusive() if exclusive else GATE.shared()

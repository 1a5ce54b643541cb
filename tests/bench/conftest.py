"""The bench tests reuse the gateway tests' in-process stack (memory broker, worker)."""

from __future__ import annotations

from tests.gateway.conftest import SECRET, Stack, StackFactory, stack, stack_factory

__all__ = ["SECRET", "Stack", "StackFactory", "stack", "stack_factory"]

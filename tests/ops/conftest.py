"""The gateway tests' in-process stack, for the admin listener tests."""

from tests.gateway.conftest import stack, stack_factory

__all__ = ["stack", "stack_factory"]

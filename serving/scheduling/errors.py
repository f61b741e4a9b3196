"""Errors of the scheduling package.

    SchedulingError
     +-- UnknownPolicyError        a policy name the factory does not know
     +-- UnsupportedVLLMVersion    the vLLM scheduler subclass is pinned to one vLLM version
"""

from __future__ import annotations


class SchedulingError(Exception):
    """Base class of the scheduling package's errors."""


class UnknownPolicyError(SchedulingError, ValueError):
    """``make_policy`` was asked for a name it does not know."""


class UnsupportedVLLMVersion(SchedulingError, RuntimeError):
    """The installed vLLM is not the version the scheduler subclass was written against."""

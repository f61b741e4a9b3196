"""Errors raised by the load-test runner and the benchmark harness.

Hierarchy::

    LoadTestError                 base of everything this package raises on purpose
    ├── WorkloadError             a workload file is missing, unparsable or invalid
    ├── TargetUnreachableError    the target answered nothing (or not like an OpenAI API)
    └── ServerStartError          bench could not start (or set up) a server it manages

A request that fails during a run is *not* an exception: it is recorded in its result.
"""

from __future__ import annotations


class LoadTestError(Exception):
    """Base class of the load-test package's errors."""


class WorkloadError(LoadTestError):
    """A workload file could not be read or does not validate."""


class TargetUnreachableError(LoadTestError):
    """The target URL does not answer ``GET {target}/models`` with 200."""


class ServerStartError(LoadTestError):
    """A server started by ``bench`` did not become ready, or its setup failed."""

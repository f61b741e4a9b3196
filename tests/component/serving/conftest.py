"""The component serving suite runs on the session's tiny engine (``tests/support/tinyengine.py``)."""

from tinyengine import ADAPTERS, ADMIN_KEY, TINY_MODEL_NAME, admin

__all__ = ["ADAPTERS", "ADMIN_KEY", "TINY_MODEL_NAME", "admin"]

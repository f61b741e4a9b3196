from __future__ import annotations

import importlib

import pytest

import lorafleet.adapters as adapters

MODULES = ["model", "keys", "errors", "basemodel", "validation", "digest", "sources", "cache",
           "ingest", "registry", "registry.base", "registry.sqlite", "registry.redis", "store",
           "secrets", "materialize", "netguard", "sandbox"]


def test_all_names_exist_and_are_sorted() -> None:
    assert sorted(adapters.__all__) == adapters.__all__
    for name in adapters.__all__:
        assert hasattr(adapters, name), name


@pytest.mark.parametrize("module", MODULES)
def test_every_module_has_a_docstring_and_valid_all(module: str) -> None:
    mod = importlib.import_module(f"lorafleet.adapters.{module}")
    assert mod.__doc__ and len(mod.__doc__.strip()) > 40
    for name in getattr(mod, "__all__", []):
        assert hasattr(mod, name), f"{module}.{name}"


def test_error_hierarchy() -> None:
    e = adapters
    assert issubclass(e.AdapterValidationError, e.AdapterError)
    assert issubclass(e.AdapterFetchError, e.AdapterError)
    for cls in (e.NotFound, e.AlreadyExists, e.RegistryUnavailable):
        assert issubclass(cls, e.RegistryError) and issubclass(cls, e.AdapterError)
    assert e.AdapterFetchError("x", transient=True).transient
    assert e.AdapterValidationError("bad", "too_large").code == "too_large"

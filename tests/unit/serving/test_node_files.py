"""An engine replica keeps adapter files in its own node's data directory (pure policy)."""

from __future__ import annotations

from lorafleet.serving.config import AdapterFilesConfig, files_on_this_node

APP = AdapterFilesConfig(data_dir="/builder", store="s3://b/p", secrets_dir="/builder/secrets",
                         cache_bytes=123, max_bytes=45)


def test_a_node_that_names_its_data_dir_gets_it_and_keeps_the_apps_store_and_bounds() -> None:
    got = files_on_this_node(APP, {"LORAFLEET_DATA_DIR": "/data"})
    assert got.data_dir == "/data"
    assert got.secrets_dir == "/data/secrets"  # the default follows the node's directory
    assert (got.store, got.cache_bytes, got.max_bytes) == ("s3://b/p", 123, 45)


def test_secrets_the_app_or_the_node_named_are_kept() -> None:
    app = APP.model_copy(update={"secrets_dir": "/mnt/secrets"})
    assert files_on_this_node(app, {"LORAFLEET_DATA_DIR": "/data"}).secrets_dir == "/mnt/secrets"
    node = {"LORAFLEET_DATA_DIR": "/data", "LORAFLEET_ADAPTER_SECRETS_DIR": "/node/secrets"}
    assert files_on_this_node(APP, node).secrets_dir == "/node/secrets"


def test_a_node_that_names_nothing_uses_the_apps_paths() -> None:
    assert files_on_this_node(APP, {}) == APP
    assert files_on_this_node(APP, {"LORAFLEET_DATA_DIR": ""}) == APP

"""Engine tests with adapters in local directories: refs by content, a real node materializer.

The engine takes adapters as content (digest + source), never as paths; these helpers give a
test the same thing a replica has: `node_files` is the real `Materializer` rooted in a scratch
"node" data directory, `local_ref` names a local adapter directory as the source.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from lorafleet.adapters.basemodel import load_base_model_info
from lorafleet.adapters.materialize import Materializer
from lorafleet.adapters.model import AdapterContent
from lorafleet.adapters.validation import ValidationLimits, validate_adapter_dir
from lorafleet.serving.assemble import make_materializer
from lorafleet.serving.config import AdapterFilesConfig, EngineConfig
from lorafleet.serving.engine.protocol import AdapterRef


def node_files(config: EngineConfig, data_dir: Path | None = None,
               store: str | None = None) -> Materializer:
    """The materializer a replica with data directory `data_dir` (default: a new temp) and the
    shared adapter store `store` uses."""
    data = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="node-"))
    return make_materializer(config, AdapterFilesConfig(
        data_dir=str(data), secrets_dir=str(data / "secrets"), store=store))


def local_ref(adapter_id: str, path: Path, model_dir: Path | str, served_name: str) -> AdapterRef:
    """A ref whose source is the local directory `path` (its digest computed here)."""
    base = load_base_model_info(model_dir, served_name)
    manifest = validate_adapter_dir(path, base, ValidationLimits())
    return AdapterRef(adapter_id, AdapterContent(manifest.digest, str(path)))

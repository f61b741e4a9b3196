"""LoRAFleet's Kubernetes operator: `LoRAAdapter` and `Tenant` resources drive the registry and serving.

Imported as `lorafleet.operator` (never as a top-level `operator`, which is the standard library).

Layers, from the inside out:
- `decisions`: pure reconcile decisions over frozen dataclasses, time passed in;
- `serving_client`, `tenant_store`: the only I/O seams (serving admin API, registry);
- `handlers`: thin kopf handlers on an explicit `kopf.OperatorRegistry`;
- `settings`, `cli`: configuration and the `lorafleet operator run` command.
"""

from __future__ import annotations

__all__ = ["GROUP", "VERSION"]

GROUP = "lorafleet.io"
VERSION = "v1alpha1"

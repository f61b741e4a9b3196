#!/usr/bin/env bash
# End to end on a real Kubernetes cluster (kind, or any cluster your kubeconfig points at).
# UNTESTED HERE: our build machines have no Kubernetes API server, no Docker and no kind; the
# same flow runs in CI against kmock's emulator (tests/component/operator/). Run it where you
# have a cluster.
#
#   1. a LoRAFleet server reachable from this machine:  lorafleet serve --admin-key "$LORAFLEET_ADMIN_KEY" \
#        --registry redis://127.0.0.1:6379/0
#   2. ./examples/kind-e2e.sh /path/to/a/peft/adapter
set -euo pipefail
ADAPTER_DIR=${1:?usage: $0 /path/to/peft/adapter}
NS=${NS:-lorafleet}
SERVING_URL=${SERVING_URL:-http://127.0.0.1:8000}
REGISTRY_URL=${REGISTRY_URL:-redis://127.0.0.1:6379/0}
: "${LORAFLEET_ADMIN_KEY:?set LORAFLEET_ADMIN_KEY to the admin key of the server}"
HERE=$(cd "$(dirname "$0")" && pwd)

if command -v kind >/dev/null && ! kubectl config current-context >/dev/null 2>&1; then
  kind create cluster --name lorafleet
fi
kubectl apply -f "$HERE/../charts/lorafleet/crds/"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -

# The operator runs here, against your kubeconfig (in a cluster: the Helm chart's Deployment).
lorafleet operator run --namespace "$NS" --serving-url "$SERVING_URL" \
  --registry "$REGISTRY_URL" --admin-key-env LORAFLEET_ADMIN_KEY &
OPERATOR=$!
trap 'kill $OPERATOR' EXIT

KEY=$(python -c 'from lorafleet.adapters.keys import generate_key; print(generate_key()[0])')
kubectl -n "$NS" create secret generic alice-key --from-literal=apiKey="$KEY"
kubectl -n "$NS" apply -f - <<YAML
apiVersion: lorafleet.io/v1alpha1
kind: Tenant
metadata: {name: alice}
spec:
  displayName: Alice
  apiKeySecrets: [{name: alice-key}]
---
apiVersion: lorafleet.io/v1alpha1
kind: LoRAAdapter
metadata: {name: demo}
spec:
  tenant: alice
  baseModel: SmolLM2-135M-Instruct
  source: {uri: "file://$ADAPTER_DIR"}
YAML
kubectl -n "$NS" wait loraadapter/demo --for=jsonpath='{.status.phase}'=Ready --timeout=120s
kubectl -n "$NS" get loras
curl -sf "$SERVING_URL/v1/chat/completions" -H "Authorization: Bearer $KEY" \
  -H 'Content-Type: application/json' \
  -d '{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}'
echo
kubectl -n "$NS" delete loraadapter demo    # unloaded everywhere, unregistered, then gone
kubectl -n "$NS" delete secret alice-key    # the key stops working

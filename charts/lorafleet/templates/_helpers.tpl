{{/*
Names, labels and shared fragments. Every resource takes its labels from here.
*/}}

{{- define "lorafleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lorafleet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "lorafleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels: stable across upgrades, so never the chart version. */}}
{{- define "lorafleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lorafleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "lorafleet.labels" -}}
helm.sh/chart: {{ include "lorafleet.chart" . }}
{{ include "lorafleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lorafleet
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of one component: include "lorafleet.componentLabels" (dict "ctx" $ "component" "serving") */}}
{{- define "lorafleet.componentLabels" -}}
{{ include "lorafleet.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "lorafleet.componentSelectorLabels" -}}
{{ include "lorafleet.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* image reference with an optional digest: registry/repo:tag[@digest] */}}
{{- define "lorafleet.imageRef" -}}
{{- $ref := printf "%s/%s:%s" .registry .repository (toString .tag) -}}
{{- if .digest -}}{{- $ref = printf "%s@%s" $ref .digest -}}{{- end -}}
{{- $ref -}}
{{- end -}}

{{- define "lorafleet.image" -}}
{{- include "lorafleet.imageRef" .Values.image -}}
{{- end -}}

{{/* Secrets: the admin key and the registry URL. */}}
{{- define "lorafleet.adminSecretName" -}}
{{- default (printf "%s-admin" (include "lorafleet.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{/* The key Prometheus scrapes /metrics with: not the admin key (a scrape config is read by
more people than the admin API should be). */}}
{{- define "lorafleet.metricsSecretName" -}}
{{- default (printf "%s-metrics" (include "lorafleet.fullname" .)) .Values.monitoring.metricsKey.existingSecret -}}
{{- end -}}

{{/* Ray's token (RAY_AUTH_TOKEN): KubeRay reads it from the key `auth_token`. */}}
{{- define "lorafleet.rayAuthSecretName" -}}
{{- default (printf "%s-ray-auth" (include "lorafleet.fullname" .)) .Values.rayService.auth.existingSecret -}}
{{- end -}}

{{- define "lorafleet.redisFullname" -}}
{{- printf "%s-redis" (include "lorafleet.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "lorafleet.redisPasswordSecretName" -}}
{{- default (include "lorafleet.redisFullname" .) .Values.redis.existingSecret -}}
{{- end -}}

{{- define "lorafleet.redisPasswordSecretKey" -}}
{{- if .Values.redis.existingSecret -}}{{ .Values.redis.existingSecretPasswordKey }}{{- else -}}redis-password{{- end -}}
{{- end -}}

{{/*
Environment shared by serving and operator containers. Credentials come from Secrets only:
the admin key, and either the bundled Redis password (the URL is assembled by the kubelet
through $(VAR) expansion, so no password appears in the pod spec) or the whole URL of an
external Redis.
*/}}
{{- define "lorafleet.registryEnv" -}}
{{- if .Values.redis.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "lorafleet.redisPasswordSecretName" . }}
      key: {{ include "lorafleet.redisPasswordSecretKey" . }}
- name: LORAFLEET_REGISTRY_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s.%s.svc:6379/0" (include "lorafleet.redisFullname" .) .Release.Namespace | quote }}
{{- else }}
- name: LORAFLEET_REGISTRY_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "redis.external.existingSecret is required when redis.enabled is false" .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.existingSecretKey }}
{{- end }}
{{- end -}}

{{/* Credentials of serving containers (ServeSettings reads LORAFLEET_*). */}}
{{- define "lorafleet.secretEnv" -}}
- name: LORAFLEET_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "lorafleet.adminSecretName" . }}
      key: {{ .Values.auth.existingSecretKey }}
- name: LORAFLEET_METRICS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "lorafleet.metricsSecretName" . }}
      key: {{ .Values.monitoring.metricsKey.existingSecretKey }}
{{ include "lorafleet.registryEnv" . | trim }}
{{- end -}}

{{- define "lorafleet.servingServiceAccountName" -}}
{{- if .Values.serving.serviceAccount.create -}}
{{- default (printf "%s-serving" (include "lorafleet.fullname" .)) .Values.serving.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serving.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "lorafleet.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "lorafleet.fullname" .)) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "lorafleet.operatorNamespace" -}}
{{- default .Release.Namespace .Values.operator.watchNamespace -}}
{{- end -}}

{{/*
The job label Prometheus gives the serving targets. The recording and alerting rules in
files/prometheus-rules.yaml select on it, so it is a constant, not derived from the release.
*/}}
{{- define "lorafleet.servingJob" -}}lorafleet-serving{{- end -}}
{{- define "lorafleet.operatorJob" -}}lorafleet-operator{{- end -}}

{{/* The CRDs shipped in crds/, parsed: a list of {group, plural} used to build the operator's RBAC. */}}
{{- define "lorafleet.crdResources" -}}
{{- $out := list -}}
{{- range $path, $_ := .Files.Glob "crds/*.yaml" -}}
{{- range $doc := regexSplit "(?m)^---\\s*$" ($.Files.Get $path) -1 -}}
{{- $obj := fromYaml $doc -}}
{{- if and $obj (eq (get $obj "kind") "CustomResourceDefinition") -}}
{{- $out = append $out (dict "group" $obj.spec.group "plural" $obj.spec.names.plural) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson (dict "items" $out) -}}
{{- end -}}

{{/* Volumes and mounts of serving containers. */}}
{{- define "lorafleet.servingVolumes" -}}
{{- if not .withoutModel }}
- name: model
  {{- toYaml (.ctx.Values.serving.model.volume | default (dict "emptyDir" (dict))) | nindent 2 }}
{{- end }}
- name: data
  {{- toYaml (.ctx.Values.serving.dataVolume | default (dict "emptyDir" (dict))) | nindent 2 }}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .ctx.Values.serving.shmSizeLimit }}
- name: tmp
  emptyDir: {}
{{- /* optional: one tenant's missing Secret fails that tenant's imports ("no credentials"),
not every serving pod's start. */}}
{{- range $i, $name := .ctx.Values.serving.adapterSecrets }}
- name: adapter-secret-{{ $i }}
  secret:
    secretName: {{ $name }}
    optional: true
{{- end }}
{{- if include "lorafleet.fileStorePath" .ctx }}
- name: adapter-store
  {{- toYaml .ctx.Values.serving.adapterStore.volume | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "lorafleet.servingVolumeMounts" -}}
{{- if not .withoutModel }}
- name: model
  mountPath: {{ .ctx.Values.serving.model.mountPath }}
  readOnly: true
{{- end }}
- name: data
  mountPath: /data
- name: dshm
  mountPath: /dev/shm
- name: tmp
  mountPath: /tmp
{{- range $i, $name := .ctx.Values.serving.adapterSecrets }}
- name: adapter-secret-{{ $i }}
  mountPath: {{ printf "%s/%s" (include "lorafleet.adapterSecretsDir" $.ctx) $name }}
  readOnly: true
{{- end }}
{{- with include "lorafleet.fileStorePath" .ctx }}
- name: adapter-store
  mountPath: {{ . }}
{{- end }}
{{- end -}}

{{/* Where adapters' secretRefs are mounted: <data dir>/secrets/<name> (adapters/secrets.py). */}}
{{- define "lorafleet.adapterSecretsDir" -}}/data/secrets{{- end -}}

{{/* The path of a file:// adapter store (mounted from serving.adapterStore.volume), else empty. */}}
{{- define "lorafleet.fileStorePath" -}}
{{- $url := .Values.serving.adapterStore.url -}}
{{- if hasPrefix "file://" $url -}}{{ trimPrefix "file://" $url }}{{- end -}}
{{- end -}}

{{/*
Environment of every serving container: the Deployment's, the Ray head's and the Ray workers'
(not the operator's: it hands an adapter's secretRef to serving and fetches nothing itself).
- The proxy's arrival stamp: Ray Serve's HTTP proxy on each node loads the middleware named by
  RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH, and the ingress trusts the stamp only where this
  variable is set (serving/api/arrival.py). `lorafleet serve` sets it itself; harmless there.
- The shared adapter store. Its credentials are the pods' ambient AWS identity
  (adapters/store.py), hence AWS_* variables from serving.adapterStore.existingSecret: every
  node that may fetch (engine replicas on workers) or import (an Ingress anywhere) needs them.
- The API surface: docs opt-in, and the admin API on its own port when serving.adminPort is
  set (ServeSettings reads LORAFLEET_API_DOCS, LORAFLEET_ADMIN_PORT).
- The request policy (ServeSettings reads LORAFLEET_IGNORE_EOS_TENANTS, a comma-separated list
  or '*', empty for nobody, and LORAFLEET_TOOL_CALL_PARSER).
- Adapter intake bounds (IntakeSettings reads LORAFLEET_INTAKE_*): an Ingress anywhere may
  import. Integers go through int64, or Helm would print a large one as 5.36870912e+08.
- Ray Serve's streaming path (serving.rayServeGrpc): gRPC streams between deployments and no
  thread hop per item, as `lorafleet serve` sets for the cluster it starts
  (serving/deploy.py STREAMING_ENVIRONMENT, docs/decisions/0024-gateway-overhead.md). Ray reads
  them at import, so every Ray node needs them; false writes Ray's own defaults.
*/}}
{{- define "lorafleet.servingEnv" -}}
- name: RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH
  value: lorafleet.serving.api.arrival:proxy_middlewares
{{- $grpc := .Values.serving.rayServeGrpc }}
- name: RAY_SERVE_USE_GRPC_BY_DEFAULT
  value: {{ ternary "1" "0" $grpc | quote }}
- name: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD
  value: {{ ternary "0" "1" $grpc | quote }}
- name: RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP
  value: {{ ternary "0" "1" $grpc | quote }}
{{- if .Values.serving.apiDocs }}
- name: LORAFLEET_API_DOCS
  value: "true"
{{- end }}
{{- with .Values.serving.requestPolicy }}
- name: LORAFLEET_IGNORE_EOS_TENANTS
  value: {{ .ignoreEosTenants | default list | join "," | quote }}
{{- with .toolCallParser }}
- name: LORAFLEET_TOOL_CALL_PARSER
  value: {{ . | quote }}
{{- end }}
{{- end }}
{{- with .Values.serving.adminPort }}
- name: LORAFLEET_ADMIN_PORT
  value: {{ . | int64 | toString | quote }}
{{- /* The admin listener binds ServeSettings.host, which a RayService sets nowhere else. */}}
- name: LORAFLEET_HOST
  value: "0.0.0.0"
{{- end }}
{{- with .Values.serving.intake }}
- name: LORAFLEET_INTAKE_ALLOW_NETWORKS
  value: {{ .allowNetworks | default list | toJson | quote }}
- name: LORAFLEET_INTAKE_FETCH_TIMEOUT_S
  value: {{ .fetchTimeoutS | toString | quote }}
- name: LORAFLEET_INTAKE_FETCH_DEADLINE_S
  value: {{ .fetchDeadlineS | toString | quote }}
- name: LORAFLEET_INTAKE_DEADLINE_S
  value: {{ .deadlineS | toString | quote }}
- name: LORAFLEET_INTAKE_MEMORY_BYTES
  value: {{ .memoryBytes | int64 | toString | quote }}
- name: LORAFLEET_INTAKE_MAX_CONCURRENT
  value: {{ .maxConcurrent | int64 | toString | quote }}
{{- end }}
- name: LORAFLEET_ADAPTER_SECRETS_DIR
  value: {{ include "lorafleet.adapterSecretsDir" . }}
{{- with .Values.serving.adapterStore }}
{{- if .url }}
- name: LORAFLEET_ADAPTER_STORE
  value: {{ .url | quote }}
{{- end }}
{{- if .endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ .endpointUrl | quote }}
{{- end }}
{{- if .existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: AWS_SECRET_ACCESS_KEY
{{- end }}
{{- end }}
{{- end -}}

{{/*
Serving pods that share one registry but not one disk need a shared adapter store: an adapter
imported on one pod is otherwise fetchable elsewhere only from a source another pod can read
again (s3://, http(s)://; adapters/materialize.py decide_refetchable), so an uploaded one answers
503 on every other pod. Several Deployment pods (or an HPA that may make several) and every
RayService (a head and GPU workers; the Ingress may import on one, the engine runs on another)
therefore fail to render without serving.adapterStore.url, unless
serving.adapterStore.allowWithoutStore says that every adapter comes from such a source.
*/}}
{{- define "lorafleet.servingPods" -}}
{{- $s := .Values.serving -}}
{{- ternary $s.autoscaling.maxReplicas $s.replicas $s.autoscaling.enabled | int -}}
{{- end -}}

{{/* "true" when adapters must travel between serving pods (several pods, or a RayService). */}}
{{- define "lorafleet.servingPodsShareAdapters" -}}
{{- if or (eq .Values.serving.mode "rayservice") (gt (include "lorafleet.servingPods" . | int) 1) -}}true{{- end -}}
{{- end -}}

{{- define "lorafleet.checkAdapterStore" -}}
{{- $s := .Values.serving -}}
{{- $pods := include "lorafleet.servingPods" . | int -}}
{{- if and (include "lorafleet.servingPodsShareAdapters" .) (not $s.adapterStore.url) (not $s.adapterStore.allowWithoutStore) -}}
{{- $what := ternary "a RayService (a Ray head and GPU workers)" (printf "up to %d serving pods" $pods) (eq $s.mode "rayservice") -}}
{{- fail (printf "serving: %s without a shared adapter store: an adapter imported on one pod could not be fetched by another (an uploaded one would answer 503 there). Set serving.adapterStore.url (s3://bucket/prefix, or file:///path with serving.adapterStore.volume), or set serving.adapterStore.allowWithoutStore=true if every adapter comes from an s3:// or http(s):// source." $what) -}}
{{- end -}}
{{- end -}}

{{- define "lorafleet.modelDir" -}}
{{- if .Values.serving.model.subPath -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.serving.model.mountPath) .Values.serving.model.subPath -}}
{{- else -}}
{{- .Values.serving.model.mountPath -}}
{{- end -}}
{{- end -}}

{{- define "lorafleet.servingPodLabels" -}}
{{ include "lorafleet.componentLabels" (dict "ctx" . "component" "serving") }}
lorafleet.io/scrape-job: {{ include "lorafleet.servingJob" . }}
{{- with .Values.serving.podLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
GPUs of one serving pod: include "lorafleet.podGpus" (dict "ctx" $ "replicas" N), N the engine
replicas in the pod. Each replica holds tensorParallelSize x gpusPerReplica GPUs (its Ray
request); a pod needs whole devices, so a fractional total rounds up.
*/}}
{{- define "lorafleet.podGpus" -}}
{{- $e := .ctx.Values.serving.engine -}}
{{- ceil (mulf (float64 .replicas) (float64 $e.tensorParallelSize) (float64 $e.gpusPerReplica)) | int -}}
{{- end -}}

{{/*
Resources of a GPU serving container: serving.resources plus the GPUs the engine replicas
ask Ray for, as one extended resource in requests and limits. Derived, not a second knob: the
schema refuses GPUs in serving.resources.
*/}}
{{- define "lorafleet.servingResources" -}}
{{- $res := deepCopy (.ctx.Values.serving.resources | default dict) -}}
{{- $gpus := include "lorafleet.podGpus" . | atoi -}}
{{- if gt $gpus 0 -}}
{{- $name := .ctx.Values.serving.engine.gpuResourceName -}}
{{- $_ := set $res "limits" (merge (dict $name $gpus) (get $res "limits" | default dict)) -}}
{{- $_ := set $res "requests" (merge (dict $name $gpus) (get $res "requests" | default dict)) -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "stratix-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or just the release name when it already contains the chart name. */}}
{{- define "stratix-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "stratix-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "stratix-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stratix-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "stratix-gateway.labels" -}}
helm.sh/chart: {{ include "stratix-gateway.chart" . }}
{{ include "stratix-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "stratix-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "stratix-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "stratix-gateway.secretName" -}}
{{- .Values.secret.existingSecret | default (include "stratix-gateway.fullname" .) }}
{{- end }}

{{- define "stratix-gateway.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* The Redis URL comes from the Secret (REDIS_URL) unless the broker uses Sentinel. */}}
{{- define "stratix-gateway.redisUrlFromSecret" -}}
{{- $b := .Values.config.broker | default dict }}
{{- if and (eq (include "stratix-gateway.brokerKind" .) "redis") $b.url (not $b.sentinels) }}true{{ end }}
{{- end }}

{{/* The Redis password comes from the Secret (REDIS_PASSWORD) with Sentinel. */}}
{{- define "stratix-gateway.redisPasswordFromSecret" -}}
{{- $b := .Values.config.broker | default dict }}
{{- if and (eq (include "stratix-gateway.brokerKind" .) "redis") $b.sentinels .Values.secret.keys.redisPassword }}true{{ end }}
{{- end }}

{{/* The broker kind from the gateway config ("memory" when unset). */}}
{{- define "stratix-gateway.brokerKind" -}}
{{- (.Values.config.broker | default dict).kind | default "memory" }}
{{- end }}

{{- define "stratix-gateway.httpPort" -}}
{{- (.Values.config.server | default dict).port | default 8080 | int }}
{{- end }}

{{/* The separate metrics port, or "" when /metrics is served on the http port. */}}
{{- define "stratix-gateway.metricsPort" -}}
{{- with (.Values.config.metrics | default dict).port }}{{ . | int }}{{ end }}
{{- end }}

{{/* Seconds the gateway may take to drain, rounded up. */}}
{{- define "stratix-gateway.drainSeconds" -}}
{{- $drain := (.Values.config.server | default dict).drain_timeout | default 10 }}
{{- ceil $drain | int }}
{{- end }}

{{- define "stratix-gateway.terminationGracePeriodSeconds" -}}
{{- $floor := add (.Values.rollout.preStopSeconds | int) (include "stratix-gateway.drainSeconds" . | int) }}
{{- if kindIs "invalid" .Values.rollout.terminationGracePeriodSeconds }}
{{- add $floor (.Values.rollout.terminationGraceMarginSeconds | int) }}
{{- else }}
{{- .Values.rollout.terminationGracePeriodSeconds | int }}
{{- end }}
{{- end }}

{{/* True ("true") when the operators' /admin API is on (config.admin.api_key set): the pod then gets GATEWAY_ADMIN_API_KEY. */}}
{{- define "stratix-gateway.adminEnabled" -}}
{{- if (.Values.config.admin | default dict).api_key }}true{{ end }}
{{- end }}

{{/* True ("true") when more than one pod can run at once outside a rollout. */}}
{{- define "stratix-gateway.multiReplica" -}}
{{- if or (gt (.Values.replicaCount | int) 1) .Values.autoscaling.enabled }}true{{ end }}
{{- end }}

{{/*
Cross-field checks a JSON schema cannot explain well. Included by the Deployment,
so `helm install`, `helm template` and `helm lint` all stop with the message.
*/}}
{{- define "stratix-gateway.validate" -}}
{{- $broker := include "stratix-gateway.brokerKind" . }}
{{- if and (include "stratix-gateway.multiReplica" .) (ne $broker "redis") }}
{{- $what := ternary "autoscaling.enabled=true" (printf "replicaCount=%d" (.Values.replicaCount | int)) .Values.autoscaling.enabled }}
{{- fail (printf "\n%s needs config.broker.kind: redis (it is %q). With the in-process broker each replica opens its own upstream stream for every resource it serves, which breaks the upstream's one-stream-per-consumer limit (streams get rejected or cut). Either keep replicaCount: 1 with autoscaling off, or set config.broker.kind: redis with config.broker.url: ${REDIS_URL} and secret.redisUrl (or the redis-url key of secret.existingSecret)." $what $broker) }}
{{- end }}
{{- if eq $broker "redis" }}
{{- $b := .Values.config.broker }}
{{- if $b.sentinels }}
{{- if not $b.sentinel_master }}
{{- fail "\nconfig.broker.sentinels is set but config.broker.sentinel_master is empty: name the master the sentinels monitor." }}
{{- end }}
{{- if $b.url }}
{{- fail "\nset either config.broker.url or config.broker.sentinels, not both." }}
{{- end }}
{{- if $b.cluster }}
{{- fail "\nconfig.broker.cluster and config.broker.sentinels exclude each other." }}
{{- end }}
{{- else }}
{{- if not $b.url }}
{{- fail "\nconfig.broker.kind is redis but config.broker.url is empty: set config.broker.url: ${REDIS_URL} (the chart fills REDIS_URL from the Secret), or config.broker.sentinels and sentinel_master for Redis Sentinel." }}
{{- end }}
{{- if not .Values.secret.keys.redisUrl }}
{{- fail "\nconfig.broker.kind is redis: secret.keys.redisUrl must name the Secret key holding the Redis URL." }}
{{- end }}
{{- end }}
{{- end }}
{{- if include "stratix-gateway.adminEnabled" . }}
{{- if not .Values.secret.keys.adminApiKey }}
{{- fail "\nconfig.admin.api_key is set: secret.keys.adminApiKey must name the Secret key holding the admin key." }}
{{- end }}
{{- if and (not .Values.secret.existingSecret) (not .Values.secret.adminApiKey) }}
{{- fail "\nconfig.admin.api_key is set but secret.adminApiKey is empty: pass the admin key (at least 32 characters) with --set secret.adminApiKey=..., or keep it in secret.existingSecret under secret.keys.adminApiKey." }}
{{- end }}
{{- end }}
{{- $floor := add (.Values.rollout.preStopSeconds | int) (include "stratix-gateway.drainSeconds" . | int) }}
{{- if le (include "stratix-gateway.terminationGracePeriodSeconds" . | int) $floor }}
{{- fail (printf "\nrollout.terminationGracePeriodSeconds=%s must exceed rollout.preStopSeconds + config.server.drain_timeout (%d s), or the kubelet kills the gateway before its streams have drained. Leave it null to derive it." (include "stratix-gateway.terminationGracePeriodSeconds" .) $floor) }}
{{- end }}
{{- with (include "stratix-gateway.metricsPort" .) }}
{{- $host := $.Values.config.metrics.host | default "127.0.0.1" }}
{{- if not (has $host (list "0.0.0.0" "::")) }}
{{- fail (printf "\nconfig.metrics.port is set but config.metrics.host is %q: set it to 0.0.0.0 so Prometheus can reach the metrics port." $host) }}
{{- end }}
{{- if eq . (include "stratix-gateway.httpPort" $) }}
{{- fail "\nconfig.metrics.port must differ from config.server.port (or be null to serve /metrics on the main port)." }}
{{- end }}
{{- end }}
{{- if and (or .Values.serviceMonitor.enabled .Values.prometheusRule.enabled) (eq (toString (.Values.config.metrics | default dict).enabled) "false") }}
{{- fail "\nserviceMonitor/prometheusRule are enabled but config.metrics.enabled is false: there would be nothing to scrape." }}
{{- end }}
{{- if and .Values.autoscaling.enabled (lt (.Values.autoscaling.maxReplicas | int) (.Values.autoscaling.minReplicas | int)) }}
{{- fail "\nautoscaling.maxReplicas must be at least autoscaling.minReplicas." }}
{{- end }}
{{- if and .Values.httpRoute.enabled (not .Values.httpRoute.parentRefs) }}
{{- fail "\nhttpRoute.enabled needs httpRoute.parentRefs (the Gateway to attach to)." }}
{{- end }}
{{- end }}

{{/* restricted-PSS pod spec pieces shared by the Deployment and the test pod. */}}
{{- define "stratix-gateway.podSecurityContext" -}}
{{ toYaml .Values.podSecurityContext }}
{{- end }}
{{- define "stratix-gateway.containerSecurityContext" -}}
{{ toYaml .Values.securityContext }}
{{- end }}

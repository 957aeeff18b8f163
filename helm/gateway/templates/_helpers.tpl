{{/* Chart name, truncated to a DNS label. */}}
{{- define "gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart unless the release name already holds the chart name. */}}
{{- define "gateway.fullname" -}}
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

{{- define "gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gateway.labels" -}}
helm.sh/chart: {{ include "gateway.chart" . }}
{{ include "gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Secret holding the HS256 secret, and its key. */}}
{{- define "gateway.jwtSecretName" -}}
{{- default (printf "%s-jwt" (include "gateway.fullname" .)) .Values.jwt.existingSecret }}
{{- end }}

{{- define "gateway.jwtSecretKey" -}}
{{- if .Values.jwt.existingSecret }}{{ .Values.jwt.existingSecretKey }}{{ else }}jwt-secret{{ end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the preStop sleep, then the whole drain
(timeout plus spread, in seconds, rounded up), plus a margin. The gateway
caps the spread at timeout / 2 and finishes within the timeout, so this is
an upper bound with room to spare; the kubelet's SIGKILL never cuts a drain.
*/}}
{{- define "gateway.terminationGracePeriodSeconds" -}}
{{- $drainMs := add (int64 .Values.drain.timeoutMs) (int64 .Values.drain.spreadMs) }}
{{- $drainS := div (add $drainMs 999) 1000 }}
{{- add (int64 .Values.drain.preStopSleepSeconds) $drainS (int64 .Values.drain.marginSeconds) }}
{{- end }}

{{/* http or https for probes, by whether the pod serves TLS. */}}
{{- define "gateway.probeScheme" -}}
{{- if .Values.tls.enabled }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}

{{/* A scalar as a TOML value: integers without a fraction, strings quoted. */}}
{{- define "gateway.tomlScalar" -}}
{{- $v := . }}
{{- if kindIs "string" $v }}{{ $v | toJson }}
{{- else if kindIs "bool" $v }}{{ $v }}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) }}
{{- if eq ($v | float64) ($v | int64 | float64) }}{{ $v | int64 }}{{ else }}{{ $v }}{{ end }}
{{- else if kindIs "slice" $v }}[{{ range $i, $e := $v }}{{ if $i }}, {{ end }}{{ include "gateway.tomlScalar" $e }}{{ end }}]
{{- else }}{{ $v }}
{{- end }}
{{- end }}

{{/*
Checks of the values that would otherwise give a broken release.
*/}}
{{- define "gateway.validate" -}}
{{- $replicas := int64 .Values.replicaCount }}
{{- if .Values.autoscaling.enabled }}{{ $replicas = int64 .Values.autoscaling.maxReplicas }}{{ end }}
{{- if and (gt $replicas 1) (not .Values.nats.url) }}
{{- fail "nats.url is required when more than one gateway pod can run (replicaCount > 1 or autoscaling.enabled): without NATS every pod is a separate chat server and clients on different pods never see each other's messages. Set nats.url to your NATS (JetStream) URLs, or replicaCount=1." }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName: a kubernetes.io/tls Secret with tls.crt and tls.key." }}
{{- end }}
{{- if not (or .Values.jwt.hs256 .Values.jwt.jwks .Values.jwt.publicKeySecret) }}
{{- fail "no token verification key: set jwt.hs256=true, jwt.jwks or jwt.publicKeySecret (without any the gateway runs in dev mode with a throw-away secret)." }}
{{- end }}
{{- if le (int64 .Values.drain.timeoutMs) 0 }}
{{- fail "drain.timeoutMs must be positive." }}
{{- end }}
{{- if lt (int64 .Values.drain.preStopSleepSeconds) 1 }}
{{- fail "drain.preStopSleepSeconds must be at least 1 (the preStop sleep action takes whole seconds)." }}
{{- end }}
{{- if and .Values.autoscaling.enabled (lt (int64 .Values.autoscaling.maxReplicas) (int64 .Values.autoscaling.minReplicas)) }}
{{- fail "autoscaling.maxReplicas must be at least autoscaling.minReplicas." }}
{{- end }}
{{- $managed := list "listen" "metrics_listen" "node_id" "nats" "nats_replicas" "drain_timeout_ms" "drain_spread_ms" "tls_cert" "tls_key" "jwt_secret" "jwks" "jwt_public_key" "jwt_issuer" "jwt_audience" "allowed_origins" "log_format" "log" "config" }}
{{- range $k, $_ := .Values.config }}
{{- if has $k $managed }}
{{- fail (printf "config.%s is set by the chart from its own values; use those (see values.yaml) instead of config." $k) }}
{{- end }}
{{- end }}
{{- end }}

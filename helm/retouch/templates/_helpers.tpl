{{/*
Names and labels (the usual `helm create` helpers).
*/}}
{{- define "retouch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "retouch.fullname" -}}
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

{{- define "retouch.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "retouch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "retouch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "retouch.labels" -}}
helm.sh/chart: {{ include "retouch.chart" . }}
{{ include "retouch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: worker
app.kubernetes.io/part-of: retouch
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "retouch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "retouch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The worker image: digest wins over tag; the default tag is <appVersion>-<variant>. */}}
{{- define "retouch.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-%s" .Chart.AppVersion .Values.image.variant) .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the AMQP URL, AWS keys and the management URL. */}}
{{- define "retouch.secretName" -}}
{{- if .Values.secrets.create }}
{{- printf "%s-credentials" (include "retouch.fullname" .) }}
{{- else }}
{{- .Values.secrets.existingSecret }}
{{- end }}
{{- end }}

{{- define "retouch.pvcName" -}}
{{- default (printf "%s-model-cache" (include "retouch.fullname" .)) .Values.modelCache.persistence.existingClaim }}
{{- end }}

{{/*
retouch.durationMs: a worker duration string ("250ms", "30s", "2m", "1h30m") in milliseconds,
as a decimal string. The schema allows only <integer><ms|s|m|h> sequences, so this parser
covers every accepted value.
*/}}
{{- define "retouch.durationMs" -}}
{{- $total := 0 }}
{{- range $part := regexFindAll "[0-9]+(ms|s|m|h)" (toString .) -1 }}
{{- $n := regexFind "^[0-9]+" $part | int64 }}
{{- $unit := trimPrefix (regexFind "^[0-9]+" $part) $part }}
{{- $mult := get (dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000) $unit | int64 }}
{{- $total = add $total (mul $n $mult) }}
{{- end }}
{{- $total }}
{{- end }}

{{/* The worker's effective prefetch: config.amqp.prefetch, or 3 × config.engine.max_batch when it is 0. */}}
{{- define "retouch.prefetch" -}}
{{- $p := int64 (default 0 .Values.config.amqp.prefetch) }}
{{- if eq $p 0 }}{{ mul 3 (int64 .Values.config.engine.max_batch) }}{{ else }}{{ $p }}{{ end }}
{{- end }}

{{/*
retouch.workerToml: the `config` map as TOML, one section per worker component in the order of
config/worker.toml ([amqp], [s3], [engine], [model], [metrics], [webhooks]), keys sorted within
each, nulls omitted; [metrics] holds the address derived from service.port. Numbers arrive as
json.Number (chart values.yaml), float64 (-f files) or int64 (--set); every numeric worker key
is an integer (the schema says so), so all are printed as integers (the worker rejects 4.0).
Lists (webhooks.allow_hosts) are lists of strings, printed as JSON arrays, which TOML reads.
*/}}
{{- define "retouch.workerToml" -}}
# Rendered by the retouch Helm chart from .Values.config; see config/worker.toml for each key.
# amqp.url and webhooks.secret come from the environment (RETOUCH_AMQP_URL,
# RETOUCH_WEBHOOKS_SECRET, from the Secret).
{{- range $section := list "amqp" "s3" "engine" "model" }}

{{ include "retouch.tomlSection" (dict "name" $section "values" (get $.Values.config $section | default dict)) }}
{{- end }}

[metrics]
addr = {{ printf "0.0.0.0:%d" (int .Values.service.port) | quote }}

{{ include "retouch.tomlSection" (dict "name" "webhooks" "values" (get .Values.config "webhooks" | default dict)) }}
{{- end }}

{{/* retouch.tomlSection: one `[name]` section of worker.toml from the map `values`. */}}
{{- define "retouch.tomlSection" -}}
[{{ .name }}]
{{- range $key := keys .values | sortAlpha }}
{{- $v := get $.values $key }}
{{- if kindIs "invalid" $v }}
{{- else if kindIs "bool" $v }}
{{ $key }} = {{ $v }}
{{- else if or (kindIs "float64" $v) (kindIs "int" $v) (kindIs "int64" $v) (eq (typeOf $v) "json.Number") }}
{{ $key }} = {{ int64 $v }}
{{- else if kindIs "slice" $v }}
{{ $key }} = [{{ range $i, $e := $v }}{{ if $i }}, {{ end }}{{ toString $e | toJson }}{{ end }}]
{{- else }}
{{ $key }} = {{ toString $v | toJson }}
{{- end }}
{{- end }}
{{- end }}

{{/* True ("true") when the model is downloaded by the init container. */}}
{{- define "retouch.prefetchModel" -}}
{{- $m := toString .Values.config.model.source }}
{{- if and .Values.modelCache.prefetch.enabled (or (hasPrefix "hf:" $m) (hasPrefix "s3://" $m)) }}true{{ end }}
{{- end }}

{{/* KEDA objects are rendered when enabled and the API is served. */}}
{{- define "retouch.kedaActive" -}}
{{- if and .Values.keda.enabled (.Capabilities.APIVersions.Has "keda.sh/v1alpha1") }}true{{ end }}
{{- end }}

{{- define "retouch.monitoringApi" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}true{{ end }}
{{- end }}

{{/*
retouch.webhookSecretKey: the key of the webhook signing secret in the Secret, or "" when no
secret source is configured (webhooks off, no RETOUCH_WEBHOOKS_SECRET). The chart-created
Secret holds one when secrets.webhookSecret is set; an existing Secret when
secrets.keys.webhookSecret names its key.
*/}}
{{- define "retouch.webhookSecretKey" -}}
{{- if .Values.secrets.create }}
{{- if .Values.secrets.webhookSecret }}{{ default "webhook-secret" .Values.secrets.keys.webhookSecret }}{{ end }}
{{- else if .Values.secrets.existingSecret }}
{{- .Values.secrets.keys.webhookSecret }}
{{- end }}
{{- end }}

{{/* Environment shared by the worker and the init container. */}}
{{- define "retouch.env" -}}
- name: HF_HOME
  value: {{ printf "%s/huggingface" (trimSuffix "/" .Values.modelCache.mountPath) | quote }}
{{- if .Values.secrets.awsCredentials }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "retouch.secretName" . }}
      key: {{ .Values.secrets.keys.awsAccessKeyId }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "retouch.secretName" . }}
      key: {{ .Values.secrets.keys.awsSecretAccessKey }}
{{- end }}
{{- if .Values.config.s3.region }}
- name: AWS_REGION
  value: {{ .Values.config.s3.region | quote }}
{{- end }}
{{- if .Values.config.s3.endpoint }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ .Values.config.s3.endpoint | quote }}
{{- end }}
{{- end }}

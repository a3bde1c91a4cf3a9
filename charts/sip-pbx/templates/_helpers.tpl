{{/* Full name of the release's objects: "<release>-sip-pbx", or fullnameOverride. */}}
{{- define "sip-pbx.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Name of the operator's ServiceAccount. */}}
{{- define "sip-pbx.serviceAccountName" -}}
{{- .Values.serviceAccount.name | default (include "sip-pbx.fullname" .) -}}
{{- end -}}

{{/* The image, tag defaulting to the chart's appVersion. */}}
{{- define "sip-pbx.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* Labels that select the operator pods. */}}
{{- define "sip-pbx.selectorLabels" -}}
app.kubernetes.io/name: sip-pbx-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every object of the chart. */}}
{{- define "sip-pbx.labels" -}}
{{ include "sip-pbx.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

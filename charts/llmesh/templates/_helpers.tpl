{{/* Labels on every object of the release. */}}
{{- define "llmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: llmesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* What selects the operator's pods. */}}
{{- define "llmesh.operatorSelector" -}}
app.kubernetes.io/name: llmesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "llmesh.operatorImage" -}}
{{ .Values.operator.image.repository }}:{{ .Values.operator.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "llmesh.sidecarImage" -}}
{{ .Values.sidecar.image.repository }}:{{ .Values.sidecar.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The names the operator's flags default to, so the chart and the operator agree. */}}
{{- define "llmesh.webhookService" -}}llmesh-operator-webhook{{- end }}
{{- define "llmesh.webhookConfiguration" -}}llmesh-sidecar-injector{{- end }}
{{- define "llmesh.webhookSecret" -}}llmesh-webhook-tls{{- end }}
{{- define "llmesh.leaseName" -}}llmesh-operator{{- end }}

{{- define "llmesh.certManager" -}}
{{- if eq .Values.webhook.certificates "cert-manager" }}true{{ end }}
{{- end }}

{{/* Monitoring objects need the Prometheus Operator's API. */}}
{{- define "llmesh.monitoringApi" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" }}true{{ end }}
{{- end }}

{{/* The operator's rules in the namespaces it watches (docs/operator.md, RBAC). */}}
{{- define "llmesh.namespacedRules" -}}
- apiGroups: [llmesh.io]
  resources: [llmendpoints]
  verbs: [get, list, watch]
- apiGroups: [llmesh.io]
  resources: [llmendpoints/status]
  verbs: [patch]
# Server-side apply of an object that does not exist yet is authorized as create.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, patch]
# Read the referenced keys, notice rotations, write or remove the llmesh-<name> copies.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create, patch, delete]
# Metadata of pods that asked for the sidecar and have none.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}

{{/* Names and labels shared by every object of the release. */}}

{{- define "roster.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "roster.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "roster.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "roster.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "roster.selectorLabels" -}}
app.kubernetes.io/name: {{ include "roster.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "roster.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "roster.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: controller
app.kubernetes.io/part-of: roster
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "roster.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "roster.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "roster.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
What the controller does with the objects it serves, verb by verb (docs/install.md says where
each one is used). The same rules go into a ClusterRole, or into a Role in watchNamespace.
*/}}
{{- define "roster.rules" -}}
# Watched (list, watch), read afresh before a silence is believed (get), expired (delete) and
# judged (status, by server-side apply).
- apiGroups: [roster.dev]
  resources: [serviceinstances]
  verbs: [get, list, watch, delete]
- apiGroups: [roster.dev]
  resources: [serviceinstances/status]
  verbs: [patch]
# Heartbeat Leases: watched, and read again before an instance is deleted.
- apiGroups: [coordination.k8s.io]
  resources: [leases]
  verbs: [get, list, watch]
# The projection: selectorless Services, their EndpointSlices and the JSON ConfigMap, created
# by server-side apply, changed by patch and removed when a service has no instances left.
- apiGroups: [""]
  resources: [services]
  verbs: [list, watch, create, patch, delete]
# Slices and the ConfigMap name their Service as owner with blockOwnerDeletion, which clusters
# enforcing owner-reference permissions allow only with this.
- apiGroups: [""]
  resources: [services/finalizers]
  verbs: [update]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch, create, patch, delete]
{{- if .Values.registry.endpoints }}
# Opt-in v1 Endpoints per service (registry.endpoints). Writing Endpoints is a power Kubernetes
# keeps from ordinary users (it can route a Service anywhere), so it is granted only when asked.
- apiGroups: [""]
  resources: [endpoints]
  verbs: [get, list, watch, create, patch, delete]
{{- end }}
# Events on instances and Services (a repeated Event is patched into a series).
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}

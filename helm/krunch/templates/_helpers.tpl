{{/* Names and labels shared by every template. */}}

{{- define "krunch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "krunch.fullname" -}}
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

{{- define "krunch.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "krunch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "krunch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "krunch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "krunch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "krunch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "krunch.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Ray Jobs API the operator submits to: the value, else the in-chart RayCluster's head service. */}}
{{- define "krunch.rayAddress" -}}
{{- if .Values.operator.rayAddress }}
{{- .Values.operator.rayAddress }}
{{- else if .Values.rayCluster.enabled }}
{{- printf "http://%s-ray-head-svc.%s.svc:8265" (include "krunch.fullname" .) .Release.Namespace }}
{{- end }}
{{- end }}

{{/* The MLflow tracking URI every job registers in: the value, else the in-chart server. */}}
{{- define "krunch.mlflowUri" -}}
{{- if .Values.mlflow.trackingUri }}
{{- .Values.mlflow.trackingUri }}
{{- else if .Values.mlflow.server.enabled }}
{{- printf "http://%s-mlflow.%s.svc:%d" (include "krunch.fullname" .) .Release.Namespace (int .Values.mlflow.server.port) }}
{{- end }}
{{- end }}

{{/* A restricted-profile container securityContext. */}}
{{- define "krunch.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end }}

{{/* The rules the operator needs, in the namespaces it watches (RBAC test: tests/helm/test_rbac.py). */}}
{{- define "krunch.operatorRules" -}}
# its jobs: kopf lists and watches them, patches finalizers and annotations, and the status subresource
- apiGroups: [krunch.dev]
  resources: [compressionjobs]
  verbs: [list, watch, patch]
- apiGroups: [krunch.dev]
  resources: [compressionjobs/status]
  verbs: [patch]
# an Event per lifecycle transition
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- if has "rayJob" .Values.operator.executors }}
# executor rayJob: one KubeRay RayJob per attempt, read for its state, deleted on cancel or deadline
- apiGroups: [ray.io]
  resources: [rayjobs]
  verbs: [create, get, delete]
{{- end }}
{{- end }}

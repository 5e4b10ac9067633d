{{/*
Names and labels shared by every template.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "wgmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every resource name: fullnameOverride, or the release name (plus the
chart name when the release name does not contain it). */}}
{{- define "wgmesh.fullname" -}}
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

{{- define "wgmesh.agent.fullname" -}}
{{- printf "%s-agent" (include "wgmesh.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "wgmesh.operator.fullname" -}}
{{- printf "%s-operator" (include "wgmesh.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The operator's leader-election Lease (its Role may touch only this one). */}}
{{- define "wgmesh.operator.leaseName" -}}
{{- include "wgmesh.operator.fullname" . -}}
{{- end -}}

{{- define "wgmesh.webhook.name" -}}
{{- include "wgmesh.fullname" . | trunc 55 | trimSuffix "-" }}-webhook
{{- end }}

{{- define "wgmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "wgmesh.labels" -}}
helm.sh/chart: {{ include "wgmesh.chart" . }}
app.kubernetes.io/name: {{ include "wgmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: wgmesh
{{- end -}}

{{/* Selector labels of one component: pass (dict "ctx" $ "component" "agent"). */}}
{{- define "wgmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wgmesh.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels of one component's objects and pods. */}}
{{- define "wgmesh.componentLabels" -}}
{{ include "wgmesh.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The image: repository@digest when a digest is set, else repository:tag (tag defaults
to the chart's appVersion). */}}
{{- define "wgmesh.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Environment both components share: logging, and the API server address when the
kubernetes Service cannot be used before the pod network exists. */}}
{{- define "wgmesh.commonEnv" -}}
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
- name: WGMESH_LOG_JSON
  value: {{ eq .Values.logFormat "json" | quote }}
{{- if or .Values.k8sServiceHost .Values.k8sServicePort }}
{{- if not (and .Values.k8sServiceHost .Values.k8sServicePort) }}
{{- fail "k8sServiceHost and k8sServicePort go together: set both (e.g. --set k8sServiceHost=10.0.0.10,k8sServicePort=6443) or neither" }}
{{- end }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .Values.k8sServiceHost | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .Values.k8sServicePort | toString | quote }}
{{- end }}
{{- end -}}

{{/* policy/v1 PodDisruptionBudgets where the cluster serves them (1.21+), policy/v1beta1
before. A live cluster lists policy/v1/PodDisruptionBudget; without one (helm template),
Helm's built-in list has only group/versions, so --kube-version decides. */}}
{{- define "wgmesh.pdbApiVersion" -}}
{{- if or (.Capabilities.APIVersions.Has "policy/v1/PodDisruptionBudget") (and (.Capabilities.APIVersions.Has "policy/v1") (semverCompare ">=1.21-0" .Capabilities.KubeVersion.Version)) -}}
policy/v1
{{- else -}}
policy/v1beta1
{{- end -}}
{{- end -}}

{{/*
Names and labels, defined once.
*/}}

{{/* The chart name (nameOverride wins). */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object's name: fullnameOverride, else the release name when it already contains
the chart name (`helm install kubetune ...` gives "kubetune"), else "<release>-<chart>".
*/}}
{{- define "kubetune.fullname" -}}
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

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator's pods; never change them (a Deployment's selector is immutable). */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels on every object the chart makes. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image: repository@digest when a digest is set, else repository:tag (default appVersion). */}}
{{- define "kubetune.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Every API call the operator makes (src/kubetune/controller/kube.py), and nothing more. Shared by the
ClusterRole and, with watchNamespace, the namespaced Role. tests/test_chart.py pins this exact set, and
manifests/base/rbac.yaml must grant the same (with secretPreCheck on).
- pods/log get: the progress lines at the end of rank 0's trainer log (trainer pods have no API access);
- persistentvolumeclaims: the per-FineTuneJob workspace claim (get, create; patch for its owner
  reference, which follows storage.reclaimPolicy; delete when the API server refuses the run);
- secrets get (secretPreCheck.enabled): whether the Hub token Secret exists before a run is created. The
  operator asks for metadata only (PartialObjectMetadata), but RBAC cannot tell the two apart: the grant
  would let it read Secret data too. Turn it off and a missing Secret is reported by the trainer instead.
*/}}
{{- define "kubetune.operatorRules" -}}
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["create", "delete"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "create", "patch", "delete"]
{{- if .Values.secretPreCheck.enabled }}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/*
The policy ConfigMap: the limits on FineTuneJobs (src/kubetune/policy.py), in the release namespace. The
admission policy's binding takes it as its parameter; the operator reads it (--policy-configmap).
*/}}
{{- define "kubetune.policyConfigMap" -}}
{{- printf "%s-policy" (include "kubetune.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* A list value of the policy as the ConfigMap holds it: one item per line. */}}
{{- define "kubetune.policyList" -}}
{{- join "\n" (. | default list) }}
{{- end }}

{{/* The Lease the operator's leader election uses (a fixed name in src/kubetune/controller/leader.py). */}}
{{- define "kubetune.leaseName" -}}
kubetune-operator
{{- end }}

{{/* Fail early on values that render but cannot work. */}}
{{- define "kubetune.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail (printf "replicaCount is %d: set leaderElection.enabled=true, or several operators would act on the same FineTuneJobs at once" (int .Values.replicaCount)) }}
{{- end }}
{{- end }}

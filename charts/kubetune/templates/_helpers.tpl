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
The operator's RBAC rules by role (operator, secretPreCheck, leaderElection, policyReader), as a dict of
rule lists. files/rbac-rules.yaml is generated from operator/src/kubetune_operator/rbac.py, which
tests/test_chart.py checks against every API call the operator makes; `tpl` fills in the policy
ConfigMap's name.
*/}}
{{- define "kubetune.rbacRules" -}}
{{- $rules := tpl (.Files.Get "files/rbac-rules.yaml") . | fromYaml }}
{{- if hasKey $rules "Error" }}
{{- fail (printf "files/rbac-rules.yaml: %s" $rules.Error) }}
{{- end }}
{{- toYaml $rules }}
{{- end }}

{{/*
Every API call the operator makes where it reconciles, and nothing more: the ClusterRole's rules or, with
watchNamespace, the namespaced Role's. The Secret pre-check's `get` on secrets only with
secretPreCheck.enabled (see files/rbac-rules.yaml for why each rule is there).
*/}}
{{- define "kubetune.operatorRules" -}}
{{- $rules := include "kubetune.rbacRules" . | fromYaml }}
{{- $out := $rules.operator }}
{{- if .Values.secretPreCheck.enabled }}
{{- $out = concat $out $rules.secretPreCheck }}
{{- end }}
{{- toYaml $out }}
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

{{/* Fail early on values that render but cannot work. */}}
{{- define "kubetune.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail (printf "replicaCount is %d: set leaderElection.enabled=true, or several operators would act on the same FineTuneJobs at once" (int .Values.replicaCount)) }}
{{- end }}
{{- end }}

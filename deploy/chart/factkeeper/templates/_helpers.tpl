{{/*
Names, labels and small building blocks shared by the templates.
*/}}

{{- define "factkeeper.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, at most 63 characters (DNS label). A release already named after the
chart is not repeated ("factkeeper", not "factkeeper-factkeeper").
*/}}
{{- define "factkeeper.fullname" -}}
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

{{- define "factkeeper.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "factkeeper.selectorLabels" -}}
app.kubernetes.io/name: {{ include "factkeeper.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The daemon's pods only (not the train-editor job's): Deployment and Service selector. */}}
{{- define "factkeeper.daemonSelectorLabels" -}}
{{ include "factkeeper.selectorLabels" . }}
app.kubernetes.io/component: daemon
{{- end }}

{{- define "factkeeper.labels" -}}
helm.sh/chart: {{ include "factkeeper.chart" . }}
{{ include "factkeeper.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: factkeeper
{{- end }}

{{- define "factkeeper.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "factkeeper.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "factkeeper.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}

{{- define "factkeeper.claimName" -}}
{{- default (printf "%s-data" (include "factkeeper.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/* The train-editor job's own claim (its FACTKEEPER_HOME); the daemon mounts editors/ of it. */}}
{{- define "factkeeper.editorClaimName" -}}
{{- default (printf "%s-editor" (include "factkeeper.fullname" .)) .Values.trainEditor.existingClaim }}
{{- end }}

{{/* Where the daemon keeps its journal, snapshots and caches (FACTKEEPER_HOME). */}}
{{- define "factkeeper.home" -}}/var/lib/factkeeper{{- end }}

{{- define "factkeeper.configDir" -}}/etc/factkeeper{{- end }}

{{/*
The `release` label kube-prometheus-stack's Prometheus selects ServiceMonitors and
PrometheusRules by (its own release name), plus any extra labels given.
*/}}
{{- define "factkeeper.prometheusLabels" -}}
{{- with .root.Values.monitoring.prometheusRelease }}
release: {{ . | quote }}
{{- end }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The daemon's config file: .Values.config with the metrics listener forced to the port the
Service, the probes and the ServiceMonitor use, so the two cannot drift apart.
*/}}
{{- define "factkeeper.configFile" -}}
{{- $config := deepCopy (default (dict) .Values.config) }}
{{- $metrics := deepCopy (default (dict) (get $config "metrics")) }}
{{- $_ := set $metrics "host" "0.0.0.0" }}
{{- $_ := set $metrics "port" (int .Values.metrics.port) }}
{{- $_ := set $config "metrics" $metrics }}
{{- toYaml $config }}
{{- end }}

{{/*
Environment of the daemon and the train-editor job: paths under FACTKEEPER_HOME (the root
filesystem is read-only) and, for the daemon, the secret references. Secrets are only ever
referenced, never rendered into the chart. Call with (dict "root" $ "secrets" bool).
*/}}
{{- define "factkeeper.env" -}}
{{- $v := .root.Values -}}
- name: FACTKEEPER_HOME
  value: {{ include "factkeeper.home" .root | quote }}
- name: HF_HOME
  value: {{ printf "%s/huggingface" (include "factkeeper.home" .root) | quote }}
- name: HOME
  value: /tmp
- name: PYTHONUNBUFFERED
  value: "1"
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
{{- if .secrets }}
{{- with $v.secrets.kafkaSaslPassword }}
{{- if .existingSecret }}
- name: FACTKEEPER_KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret | quote }}
      key: {{ .key | quote }}
{{- end }}
{{- end }}
{{- with $v.secrets.kafkaCa }}
{{- if .existingSecret }}
- name: FACTKEEPER_KAFKA__SSL_CAFILE
  value: {{ printf "%s/%s" (trimSuffix "/" .mountPath) .key | quote }}
{{- end }}
{{- end }}
{{- with $v.secrets.adminToken }}
{{- if .existingSecret }}
- name: FACTKEEPER_ADMIN__TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret | quote }}
      key: {{ .key | quote }}
{{- end }}
{{- end }}
{{- with $v.secrets.controlKey }}
{{- if .existingSecret }}
- name: FACTKEEPER_CONTROL__KEYS__{{ .keyId }}
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret | quote }}
      key: {{ .key | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Container resources with the GPU added to limits only (Kubernetes takes extended resources
from limits; requests default to them and may not differ).
Call with (dict "resources" ... "gpu" ...).
*/}}
{{- define "factkeeper.resources" -}}
{{- $resources := deepCopy (default (dict) .resources) }}
{{- $requests := default (dict) (get $resources "requests") }}
{{- if hasKey $requests .gpu.resourceName }}
{{- fail (printf "put %s in limits via gpu.enabled/gpu.count, not in resources.requests" .gpu.resourceName) }}
{{- end }}
{{- if .enabled }}
{{- $limits := deepCopy (default (dict) (get $resources "limits")) }}
{{- $_ := set $limits .gpu.resourceName (int .count) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- if $resources }}
{{- toYaml $resources }}
{{- else -}}
{}
{{- end }}
{{- end }}

{{/*
Pod scheduling: the general knobs plus, when a GPU is requested, the GPU node selector,
tolerations and runtime class. Call with (dict "root" $ "gpuEnabled" bool), optionally with
"affinity" to use instead of .Values.affinity.
*/}}
{{- define "factkeeper.scheduling" -}}
{{- $v := .root.Values }}
{{- $affinity := ternary .affinity $v.affinity (hasKey . "affinity") }}
{{- $nodeSelector := deepCopy (default (dict) $v.nodeSelector) }}
{{- $tolerations := default (list) $v.tolerations }}
{{- if .gpuEnabled }}
{{- $nodeSelector = merge $nodeSelector (default (dict) $v.gpu.nodeSelector) }}
{{- $tolerations = concat $tolerations (default (list) $v.gpu.tolerations) }}
{{- with $v.gpu.runtimeClassName }}
runtimeClassName: {{ . | quote }}
{{- end }}
{{- end }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
Pod template of the train-editor Job/CronJob. Call with (dict "root" $ "claim" <claim name>).
On a ReadWriteOnce claim the job must run on the daemon's node (pod affinity), since the
daemon mounts the same claim's editors/ folder.
*/}}
{{- define "factkeeper.trainEditorPod" -}}
{{- $root := .root }}
{{- $t := $root.Values.trainEditor }}
{{- $affinity := deepCopy (default (dict) $root.Values.affinity) }}
{{- $modes := $t.persistence.accessModes }}
{{- if and (has "ReadWriteOnce" $modes) (not (has "ReadWriteMany" $modes)) }}
{{- $term := dict "topologyKey" "kubernetes.io/hostname" "labelSelector" (dict "matchLabels" (include "factkeeper.daemonSelectorLabels" $root | fromYaml)) }}
{{- $podAffinity := deepCopy (default (dict) (get $affinity "podAffinity")) }}
{{- $required := default (list) (get $podAffinity "requiredDuringSchedulingIgnoredDuringExecution") }}
{{- $_ := set $podAffinity "requiredDuringSchedulingIgnoredDuringExecution" (append $required $term) }}
{{- $_ := set $affinity "podAffinity" $podAffinity }}
{{- end }}
metadata:
  labels:
    {{- include "factkeeper.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: train-editor
spec:
  restartPolicy: Never
  serviceAccountName: {{ include "factkeeper.serviceAccountName" $root }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with include "factkeeper.scheduling" (dict "root" $root "gpuEnabled" $t.gpu.enabled "affinity" $affinity) | trim }}
  {{- . | nindent 2 }}
  {{- end }}
  containers:
    - name: train-editor
      image: {{ include "factkeeper.image" $root | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command:
        - factkeeper
        - train-editor
        - --model
        - {{ $t.model | quote }}
        - --dataset
        - {{ $t.dataset | quote }}
        - --device
        - {{ $t.device | quote }}
        {{- range $t.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      env:
        {{- include "factkeeper.env" (dict "root" $root "secrets" false) | nindent 8 }}
      resources:
        {{- include "factkeeper.resources" (dict "resources" $t.resources "gpu" $root.Values.gpu "enabled" $t.gpu.enabled "count" $t.gpu.count) | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: data
          mountPath: {{ include "factkeeper.home" $root }}
        - name: tmp
          mountPath: /tmp
        - name: shm
          mountPath: /dev/shm
  volumes:
    - name: data
      persistentVolumeClaim:
        claimName: {{ .claim }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ $root.Values.tmp.sizeLimit }}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $root.Values.shm.sizeLimit }}
{{- end }}

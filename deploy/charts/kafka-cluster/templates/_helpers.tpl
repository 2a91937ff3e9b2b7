{{- define "kafka-cluster.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: factkeeper
{{- end }}

{{/* Labels of resources the Strimzi operators attach to the cluster. */}}
{{- define "kafka-cluster.clusterLabels" -}}
{{ include "kafka-cluster.labels" . }}
strimzi.io/cluster: {{ .Values.clusterName }}
{{- end }}

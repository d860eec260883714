{{/*
Names, labels and derived addresses shared by every template. Each object gets the standard
app.kubernetes.io labels; selectors use only the stable subset (name, instance, component) so an
upgrade never needs to change an immutable selector.
*/}}

{{- define "edge-fleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "edge-fleet.fullname" -}}
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

{{/* Names with a suffix stay within 63 characters. */}}
{{- define "edge-fleet.controller.fullname" -}}
{{- printf "%s-controller" (include "edge-fleet.fullname" . | trunc 52 | trimSuffix "-") -}}
{{- end -}}

{{- define "edge-fleet.agent.fullname" -}}
{{- printf "%s-agent" (include "edge-fleet.fullname" . | trunc 57 | trimSuffix "-") -}}
{{- end -}}

{{- define "edge-fleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "edge-fleet.labels" -}}
helm.sh/chart: {{ include "edge-fleet.chart" . }}
app.kubernetes.io/name: {{ include "edge-fleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: edge-fleet
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "edge-fleet.controller.selectorLabels" -}}
app.kubernetes.io/name: {{ include "edge-fleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{- define "edge-fleet.controller.labels" -}}
{{ include "edge-fleet.labels" . }}
app.kubernetes.io/component: controller
{{- end -}}

{{- define "edge-fleet.agent.labels" -}}
{{ include "edge-fleet.labels" . }}
app.kubernetes.io/component: agent
{{- end -}}

{{- define "edge-fleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "edge-fleet.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "edge-fleet.controller.image" -}}
{{- printf "%s:%s" .Values.controller.image.repository (default .Chart.AppVersion .Values.controller.image.tag) -}}
{{- end -}}

{{- define "edge-fleet.agent.image" -}}
{{- printf "%s:%s" .Values.agent.image.repository (default .Chart.AppVersion .Values.agent.image.tag) -}}
{{- end -}}

{{/* In-cluster REST and gRPC addresses of this release's controller. */}}
{{- define "edge-fleet.controller.httpUrl" -}}
{{- printf "http://%s.%s.svc:%d" (include "edge-fleet.controller.fullname" .) .Release.Namespace (int .Values.controller.service.httpPort) -}}
{{- end -}}

{{- define "edge-fleet.controller.grpcAddr" -}}
{{- printf "%s-grpc.%s.svc:%d" (include "edge-fleet.controller.fullname" .) .Release.Namespace (int .Values.controller.service.grpcPort) -}}
{{- end -}}

{{- define "edge-fleet.controller.grpcEnrollAddr" -}}
{{- printf "%s-grpc.%s.svc:%d" (include "edge-fleet.controller.fullname" .) .Release.Namespace (int .Values.controller.service.grpcEnrollPort) -}}
{{- end -}}

{{/* FLEET_PUBLIC_URL: explicit value, else the Ingress host, else the in-cluster Service. */}}
{{- define "edge-fleet.controller.publicUrl" -}}
{{- if .Values.controller.publicUrl -}}
{{- .Values.controller.publicUrl -}}
{{- else if .Values.ingress.enabled -}}
{{- printf "%s://%s" (ternary "https" "http" (gt (len .Values.ingress.tls) 0)) .Values.ingress.host -}}
{{- else -}}
{{- include "edge-fleet.controller.httpUrl" . -}}
{{- end -}}
{{- end -}}

{{- define "edge-fleet.dbSecretName" -}}
{{- default (printf "%s-db" (include "edge-fleet.controller.fullname" .)) .Values.database.postgresql.existingSecret -}}
{{- end -}}

{{- define "edge-fleet.adminTokenSecretName" -}}
{{- default (printf "%s-admin-token" (include "edge-fleet.controller.fullname" .)) .Values.controller.access.adminToken.existingSecret -}}
{{- end -}}

{{- define "edge-fleet.s3SecretName" -}}
{{- default (printf "%s-s3" (include "edge-fleet.controller.fullname" .)) .Values.artifactStore.s3.existingSecret -}}
{{- end -}}

{{/* Whether the controller gets S3 credentials from a Secret at all (else boto3's default chain). */}}
{{- define "edge-fleet.s3HasSecret" -}}
{{- if or .Values.artifactStore.s3.existingSecret .Values.artifactStore.s3.accessKeyId -}}true{{- end -}}
{{- end -}}

{{- define "edge-fleet.agent.tokenSecretName" -}}
{{- default (printf "%s-enroll" (include "edge-fleet.agent.fullname" .)) .Values.agent.enrollToken.existingSecret -}}
{{- end -}}

{{- define "edge-fleet.agent.trustRootConfigMapName" -}}
{{- default (printf "%s-trust-root" (include "edge-fleet.agent.fullname" .)) .Values.agent.trustRoot.existingConfigMap -}}
{{- end -}}

{{- define "edge-fleet.agent.caConfigMapName" -}}
{{- default (printf "%s-controller-ca" (include "edge-fleet.agent.fullname" .)) .Values.agent.caCert.existingConfigMap -}}
{{- end -}}

{{/* The host devices enrol through from outside: ingress.grpc.enroll.host, else ingress.grpc.host. */}}
{{- define "edge-fleet.grpcEnrollHost" -}}
{{- default .Values.ingress.grpc.host .Values.ingress.grpc.enroll.host -}}
{{- end -}}

{{/* gRPC addresses through Traefik (host:external port of the entry point), as devices dial them. */}}
{{- define "edge-fleet.controller.externalGrpcAddr" -}}
{{- printf "%s:%d" .Values.ingress.grpc.host (int .Values.ingress.grpc.device.port) -}}
{{- end -}}

{{- define "edge-fleet.controller.externalEnrollAddr" -}}
{{- printf "%s:%d" (include "edge-fleet.grpcEnrollHost" .) (int .Values.ingress.grpc.enroll.port) -}}
{{- end -}}

{{/*
Traefik routes passthrough TLS by entry point and SNI only: the device and enrolment routes must
differ in one of them, or Traefik sends both ports' connections to one of them.
*/}}
{{- define "edge-fleet.grpcRoutes.validate" -}}
{{- $g := .Values.ingress.grpc -}}
{{- if eq $g.host (include "edge-fleet.grpcEnrollHost" .) -}}
{{- range $ep := $g.enroll.entryPoints -}}
{{- if has $ep $g.device.entryPoints -}}
{{- fail (printf "ingress.grpc: the device and enrolment routes both use entry point %q and host %q, so Traefik cannot tell them apart; give ingress.grpc.enroll its own entry point or its own host (ingress.grpc.enroll.host)" $ep $g.host) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

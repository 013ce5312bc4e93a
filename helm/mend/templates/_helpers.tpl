{{/* The chart's name. */}}
{{- define "mend.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name, the prefix of every object. */}}
{{- define "mend.fullname" -}}
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

{{- define "mend.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "mend.labels" -}}
helm.sh/chart: {{ include "mend.chart" . }}
app.kubernetes.io/name: {{ include "mend.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: include "mend.selectorLabels" (list $ "processor"). */}}
{{- define "mend.selectorLabels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "mend.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* The image reference. */}}
{{- define "mend.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The name of the Secret holding the NATS credentials as MEND_NATS_* keys, or "" for none. */}}
{{- define "mend.natsSecret" -}}
{{- if .Values.nats.auth.existingSecret -}}
{{- .Values.nats.auth.existingSecret -}}
{{- else if or .Values.nats.auth.token .Values.nats.auth.user -}}
{{- printf "%s-nats" (include "mend.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/*
The NATS credential and TLS files of the chart's values, as the normalized dict that "mend.sidecar",
"mend.sidecarVolumes" and "mend.natsFiles*" take (YAML; `include "mend.natsFiles" . | fromYaml`):
  creds: {secretName, key}             a .creds file (JWT + NKey seed)       -> [nats] creds
  nkey:  {secretName, key}             a file holding an NKey seed            -> [nats] nkey_seed_file
  tls:   {secretName, ca, cert, key}   PEM files (each key optional)          -> [nats] tls_ca, tls_cert, tls_key
  tlsRequired: bool                                                           -> [nats] tls_required
Each present entry is a Secret mounted read-only at /etc/mend-nats/<creds|nkey|tls>/<key>.
*/}}
{{- define "mend.natsFiles" -}}
{{- $n := .Values.nats -}}
{{- $fullname := include "mend.fullname" . -}}
{{- with $n.auth.creds }}
{{- if or .existingSecret .contents }}
creds:
  secretName: {{ default (printf "%s-nats-files" $fullname) .existingSecret | quote }}
  key: {{ .key | quote }}
{{- end }}
{{- end }}
{{- with $n.auth.nkey }}
{{- if or .existingSecret .contents }}
nkey:
  secretName: {{ default (printf "%s-nats-files" $fullname) .existingSecret | quote }}
  key: {{ .key | quote }}
{{- end }}
{{- end }}
{{- with $n.tls }}
{{- if .existingSecret }}
{{- if not (or .ca .cert) }}
{{- fail "nats.tls.existingSecret needs nats.tls.ca or nats.tls.cert/nats.tls.key (the Secret's keys to mount)" }}
{{- end }}
{{- if ne (empty .cert) (empty .key) }}
{{- fail "nats.tls.cert and nats.tls.key go together (a client certificate and its key, for mutual TLS)" }}
{{- end }}
tls:
  secretName: {{ .existingSecret | quote }}
  ca: {{ .ca | quote }}
  cert: {{ .cert | quote }}
  key: {{ .key | quote }}
{{- end }}
tlsRequired: {{ .required }}
{{- end }}
{{- end -}}

{{/* The mount directory of one kind of NATS file. */}}
{{- define "mend.natsFilesDir" -}}
/etc/mend-nats/{{ . }}
{{- end -}}

{{/* MEND_NATS_* variables naming the mounted files: include "mend.natsFilesEnv" <natsFiles dict>. */}}
{{- define "mend.natsFilesEnv" -}}
{{- with .creds }}
- name: MEND_NATS_CREDS
  value: {{ printf "%s/%s" (include "mend.natsFilesDir" "creds") .key | quote }}
{{- end }}
{{- with .nkey }}
- name: MEND_NATS_NKEY_SEED_FILE
  value: {{ printf "%s/%s" (include "mend.natsFilesDir" "nkey") .key | quote }}
{{- end }}
{{- with .tls }}
{{- $dir := include "mend.natsFilesDir" "tls" }}
{{- with .ca }}
- name: MEND_NATS_TLS_CA
  value: {{ printf "%s/%s" $dir . | quote }}
{{- end }}
{{- with .cert }}
- name: MEND_NATS_TLS_CERT
  value: {{ printf "%s/%s" $dir . | quote }}
{{- end }}
{{- with .key }}
- name: MEND_NATS_TLS_KEY
  value: {{ printf "%s/%s" $dir . | quote }}
{{- end }}
{{- end }}
{{- if .tlsRequired }}
- name: MEND_NATS_TLS_REQUIRED
  value: "true"
{{- end }}
{{- end -}}

{{/* [nats] keys naming the mounted files, for a rendered TOML config: include "mend.natsFilesToml" <natsFiles dict>. */}}
{{- define "mend.natsFilesToml" -}}
{{- with .creds }}
creds          = {{ include "mend.toml" (printf "%s/%s" (include "mend.natsFilesDir" "creds") .key) }}
{{- end }}
{{- with .nkey }}
nkey_seed_file = {{ include "mend.toml" (printf "%s/%s" (include "mend.natsFilesDir" "nkey") .key) }}
{{- end }}
{{- with .tls }}
{{- $dir := include "mend.natsFilesDir" "tls" }}
{{- with .ca }}
tls_ca         = {{ include "mend.toml" (printf "%s/%s" $dir .) }}
{{- end }}
{{- with .cert }}
tls_cert       = {{ include "mend.toml" (printf "%s/%s" $dir .) }}
{{- end }}
{{- with .key }}
tls_key        = {{ include "mend.toml" (printf "%s/%s" $dir .) }}
{{- end }}
{{- end }}
{{- if .tlsRequired }}
tls_required   = true
{{- end }}
{{- end -}}

{{/* The read-only mounts of the NATS files: include "mend.natsFilesMounts" (dict "files" <natsFiles> "prefix" "mend-"). */}}
{{- define "mend.natsFilesMounts" -}}
{{- $prefix := default "" .prefix -}}
{{- range $kind := list "creds" "nkey" "tls" }}
{{- if get $.files $kind }}
- name: {{ $prefix }}nats-{{ $kind }}
  mountPath: {{ include "mend.natsFilesDir" $kind }}
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{/* The Secret volumes of the NATS files (only the named keys): same dict as "mend.natsFilesMounts". */}}
{{- define "mend.natsFilesVolumes" -}}
{{- $prefix := default "" .prefix -}}
{{- range $kind := list "creds" "nkey" "tls" }}
{{- with get $.files $kind }}
- name: {{ $prefix }}nats-{{ $kind }}
  secret:
    secretName: {{ .secretName }}
    # Readable by the container's non-root user whatever the pod's fsGroup.
    defaultMode: 0444
    items:
      {{- range $k := list .key .ca .cert }}
      {{- if $k }}
      - key: {{ $k | quote }}
        path: {{ $k | quote }}
      {{- end }}
      {{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The environment of every role: NATS URL, logs, and the NATS credentials Secret. */}}
{{- define "mend.env" -}}
{{- $files := include "mend.natsFiles" . | fromYaml -}}
env:
  - name: MEND_NATS_URL
    value: {{ .Values.nats.url | quote }}
  - name: MEND_NATS_REPLICAS
    value: {{ .Values.nats.replicas | quote }}
  - name: MEND_LOG
    value: {{ .Values.logLevel | quote }}
  - name: MEND_LOG_FORMAT
    value: {{ .Values.logFormat | quote }}
  {{- include "mend.natsFilesEnv" $files | nindent 2 }}
  {{- with .Values.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with include "mend.natsSecret" . }}
envFrom:
  - secretRef:
      name: {{ . }}
{{- end }}
{{- end -}}

{{/* TOML "key = value" lines of a map (strings quoted, numbers and booleans bare). */}}
{{- define "mend.tomlKeys" -}}
{{- range $k, $v := . }}
{{ $k }} = {{ include "mend.toml" $v }}
{{- end }}
{{- end -}}

{{/*
The mend sidecar container for your own pods. Put it in your pod's containers and the volumes of
"mend.sidecarVolumes" in its volumes:

  containers:
    - name: app
      ...
    {{- include "mend.sidecar" (dict "configMap" "orders-mend" "image" "ghcr.io/mend/mend:0.1.0") | nindent 4 }}
  volumes:
    {{- include "mend.sidecarVolumes" (dict "configMap" "orders-mend") | nindent 4 }}

The dict: configMap (required) names a ConfigMap with a key sidecar.toml; image (required); optional
natsSecret (a Secret with MEND_NATS_* keys, passed as environment), natsReplicas (MEND_NATS_REPLICAS:
give every role the same replicas, the first to start creates mend's streams), natsFiles (NATS
credential and TLS files from Secrets, mounted read-only under /etc/mend-nats and named by
MEND_NATS_CREDS, MEND_NATS_NKEY_SEED_FILE, MEND_NATS_TLS_CA/_CERT/_KEY, MEND_NATS_TLS_REQUIRED; pass
the same natsFiles to "mend.sidecarVolumes"), port (9464), resources, logFormat, readiness (false).
natsFiles is a dict like
  (dict "creds" (dict "secretName" "orders-nats" "key" "nats.creds")
        "nkey" (dict "secretName" "orders-nkey" "key" "nkey.seed")
        "tls" (dict "secretName" "nats-client-tls" "ca" "ca.crt" "cert" "tls.crt" "key" "tls.key")
        "tlsRequired" true)
(every entry optional), or this chart's own: (include "mend.natsFiles" . | fromYaml). The readiness probe (/readyz) is off by default: a standby sidecar, waiting for
another replica's lease, answers 503 there, which would take your app's pod out of its Service.
The sidecar listens on 0.0.0.0:<port> (MEND_LISTEN) for /healthz, /readyz and /metrics.
*/}}
{{- define "mend.sidecar" -}}
{{- $port := int (default 9464 .port) -}}
- name: mend-sidecar
  image: {{ required "mend.sidecar: image is required" .image | quote }}
  args: ["sidecar", "--config", "/etc/mend/sidecar.toml"]
  env:
    - name: MEND_LOG_FORMAT
      value: {{ default "json" .logFormat | quote }}
    - name: MEND_LISTEN
      value: {{ printf "0.0.0.0:%d" $port | quote }}
    {{- with .natsReplicas }}
    - name: MEND_NATS_REPLICAS
      value: {{ . | quote }}
    {{- end }}
    {{- with .natsFiles }}
    {{- include "mend.natsFilesEnv" . | nindent 4 }}
    {{- end }}
  {{- with .natsSecret }}
  envFrom:
    - secretRef:
        name: {{ . }}
  {{- end }}
  ports:
    - name: mend-metrics
      containerPort: {{ $port }}
      protocol: TCP
  livenessProbe:
    httpGet:
      path: /healthz
      port: mend-metrics
    periodSeconds: 10
    failureThreshold: 3
  {{- if .readiness }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: mend-metrics
    periodSeconds: 5
    failureThreshold: 2
  {{- end }}
  {{- with .resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    readOnlyRootFilesystem: true
    allowPrivilegeEscalation: false
    capabilities:
      drop: ["ALL"]
    seccompProfile:
      type: RuntimeDefault
  volumeMounts:
    - name: mend-sidecar-config
      mountPath: /etc/mend
      readOnly: true
    - name: mend-sidecar-tmp
      mountPath: /tmp
    {{- with .natsFiles }}
    {{- include "mend.natsFilesMounts" (dict "files" . "prefix" "mend-") | nindent 4 }}
    {{- end }}
{{- end -}}

{{/* The volumes "mend.sidecar" mounts: dict with configMap, and natsFiles if "mend.sidecar" has it. */}}
{{- define "mend.sidecarVolumes" -}}
- name: mend-sidecar-config
  configMap:
    name: {{ required "mend.sidecarVolumes: configMap is required" .configMap }}
- name: mend-sidecar-tmp
  emptyDir: {}
{{- with .natsFiles }}
{{- include "mend.natsFilesVolumes" (dict "files" . "prefix" "mend-") }}
{{- end }}
{{- end -}}

{{/* Probes of a role on its named port "http". */}}
{{/* Probes of /healthz and /readyz on the named container port given. */}}
{{- define "mend.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: {{ . }}
  periodSeconds: 10
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /readyz
    port: {{ . }}
  periodSeconds: 5
  failureThreshold: 2
{{- end -}}

{{/* processor.toml. */}}
{{- define "mend.processorToml" -}}
# Rendered by the mend chart. MEND_NATS_URL and the MEND_NATS_* credentials come from the environment
# (the environment also names the files of [nats], for configs that are not rendered by the chart).
nats_url    = {{ include "mend.toml" .Values.nats.url }}
rules       = "/etc/mend/rules"
max_repairs = {{ int .Values.processor.maxRepairs }}
listen      = "0.0.0.0:{{ int .Values.processor.port }}"
{{- include "mend.tomlKeys" .Values.processor.extraConfig }}

{{ include "mend.natsToml" . }}
{{- end -}}

{{/* The [nats] table of a rendered config: replicas and the mounted credential and TLS files. */}}
{{- define "mend.natsToml" -}}
[nats]
replicas       = {{ int .Values.nats.replicas }}
{{- include "mend.natsFilesToml" (include "mend.natsFiles" . | fromYaml) }}
{{- end -}}

{{/* A value as TOML (JSON's strings, numbers, booleans and arrays are TOML's, without HTML escapes). */}}
{{- define "mend.toml" -}}
{{- toJson . | replace "\\u003c" "<" | replace "\\u003e" ">" | replace "\\u0026" "&" -}}
{{- end -}}

{{/* dashboard.toml, users and tokens included. */}}
{{- define "mend.dashboardToml" -}}
# Rendered by the mend chart. MEND_NATS_URL and the MEND_NATS_* credentials come from the environment
# (the environment also names the files of [nats], for configs that are not rendered by the chart).
nats_url     = {{ include "mend.toml" .Values.nats.url }}
database_url = {{ include "mend.toml" .Values.dashboard.databaseUrl }}
listen       = "0.0.0.0:{{ int .Values.dashboard.port }}"
ops_listen   = "0.0.0.0:{{ int .Values.dashboard.opsPort }}"
rules        = "/etc/mend/rules"
{{- with .Values.dashboard.mask }}
mask         = {{ include "mend.toml" . }}
{{- end }}
{{- include "mend.tomlKeys" .Values.dashboard.extraConfig }}

{{ include "mend.natsToml" . }}
{{- range .Values.dashboard.users }}

[[user]]
name          = {{ include "mend.toml" .name }}
role          = {{ include "mend.toml" .role }}
password_hash = {{ include "mend.toml" .passwordHash }}
{{- end }}
{{- range .Values.dashboard.apiTokens }}

[[api_token]]
name   = {{ include "mend.toml" .name }}
role   = {{ include "mend.toml" .role }}
sha256 = {{ include "mend.toml" .sha256 }}
{{- end }}
{{- end -}}

{{/*
An alert's link to the Grafana dashboard (uid mend-overview): `dashboard_uid` always, and
`dashboard_url` when Grafana's address is set.
*/}}
{{- define "mend.dashboardLink" -}}
dashboard_uid: mend-overview
{{- if .url }}
dashboard_url: {{ printf "%s/d/mend-overview" (trimSuffix "/" .url) | quote }}
{{- end }}
{{- end }}

#!/usr/bin/env bash
# deploy/checks/run.sh: checks of the deployment files (chart, alerts, dashboard, images,
# laptop stack). tests/run calls it after the Rust tests; run it alone with
#   eval "$(tests/run --services-only)" && deploy/checks/run.sh
#
# Needs RETOUCH_TEST_HELM, RETOUCH_TEST_KUBE_VALIDATE and RETOUCH_TEST_PROMTOOL (installed and
# exported by tests/run) and fails without them; installs hadolint itself (tools.sh). Every
# check runs even if an earlier one failed; a summary with durations closes the output and the
# exit status is 1 if any check failed.
#
#  helm-lint        helm lint --strict, default values and each helm/retouch/ci/*.yaml
#  helm-template    helm template of the same sets for Kubernetes 1.29 and 1.33 (with the KEDA
#                   and prometheus-operator APIs), plus the CRD guard without those APIs; NOTES.txt
#                   for every set, and its warning on deprecated flat RETOUCH_<KEY> variables
#  chart-failures   values that must be refused (validation.yaml and the schema), with the
#                   expected message, and the boundary that must pass
#  kube-validate    kubernetes-validate --strict of every rendering, against 1.29 and 1.33
#                   (CRD objects only WARN: no schema bundled)
#  chart-asserts    chart_asserts.py on the renderings (worker contract, security, KEDA, ...)
#  meta             meta.py: values docs + README table, schema, config sections and keys vs
#                   config/worker.toml, metric names vs metrics.rs, dashboard, compose
#  rules            promtool check rules (alerts, chart copy, dashboard queries), promtool
#                   test rules, promtool check config of the laptop stack's prometheus.yml
#  copies           chart copies of the rules and the dashboard are byte-identical
#  hadolint         deploy/docker/Dockerfile.{cpu,cuda} with deploy/docker/hadolint.yaml

# The check_* functions are called through run_check "check_${name//-/_}".
# shellcheck disable=SC2317
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
# shellcheck source=deploy/checks/tools.sh
source deploy/checks/tools.sh

CHART=helm/retouch
KUBE_VERSIONS=(1.29.0 1.33.0)
CRD_APIS=(--api-versions keda.sh/v1alpha1 --api-versions monitoring.coreos.com/v1)
T_START=$(rt_now)

missing=()
for v in RETOUCH_TEST_HELM RETOUCH_TEST_KUBE_VALIDATE RETOUCH_TEST_PROMTOOL; do
  if [ -z "${!v:-}" ] || [ ! -x "${!v}" ]; then missing+=("$v"); fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deploy/checks: ${missing[*]} unset or not executable." >&2
  echo "  Run through tests/run, or first: eval \"\$(tests/run --services-only)\"" >&2
  exit 1
fi
rt_ensure_hadolint
HELM=$RETOUCH_TEST_HELM
PROMTOOL=$RETOUCH_TEST_PROMTOOL
KUBE_VALIDATE=$RETOUCH_TEST_KUBE_VALIDATE
# The kubernetes-validate venv has PyYAML and jsonschema.
PY=$(dirname "$KUBE_VALIDATE")/python
[ -x "$PY" ] || { echo "deploy/checks: no python next to $KUBE_VALIDATE" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/retouch-checks.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

VALUE_SETS=(default)
for f in "$CHART"/ci/*.yaml; do VALUE_SETS+=("$f"); done

# values_args SET: the -f arguments of a value set ("default" has none).
values_args() { [ "$1" = default ] || printf '%s\n' -f "$1"; }
set_name() { if [ "$1" = default ]; then echo default; else basename "$1" .yaml; fi; }

# --- checks (each prints a few lines; non-zero on failure) -----------------------------------

check_helm_lint() {
  local set args
  for set in "${VALUE_SETS[@]}"; do
    mapfile -t args < <(values_args "$set")
    "$HELM" lint --strict --quiet --kube-version "${KUBE_VERSIONS[0]}" "$CHART" "${args[@]}" >"$WORK/lint.out" 2>&1 \
      || { cat "$WORK/lint.out"; echo "lint failed: $set"; return 1; }
    echo "lint --strict ok: $(set_name "$set")"
  done
}

check_helm_template() {
  local set args kv out n
  for kv in "${KUBE_VERSIONS[@]}"; do
    mkdir -p "$WORK/render/$kv"
    for set in "${VALUE_SETS[@]}"; do
      mapfile -t args < <(values_args "$set")
      out="$WORK/render/$kv/$(set_name "$set").yaml"
      "$HELM" template retouch "$CHART" --namespace retouch --kube-version "$kv" "${CRD_APIS[@]}" \
        "${args[@]}" >"$out" || { echo "template failed: $set ($kv)"; return 1; }
      n=$(grep -c '^kind:' "$out")
      echo "template ok: $(set_name "$set") for $kv ($n objects: $(grep '^kind:' "$out" | awk '{print $2}' | sort | uniq -c | awk '{printf "%s%s ", $2, ($1 > 1 ? "x" $1 : "")}'))"
    done
  done
  # Without the CRD APIs the guarded objects must disappear and the Deployment keep replicas.
  out="$WORK/no-crd-apis.yaml"
  "$HELM" template retouch "$CHART" -f "$CHART/ci/gpu-keda-values.yaml" >"$out"
  if grep -Eq '^kind: (ScaledObject|TriggerAuthentication|ServiceMonitor|PrometheusRule)$' "$out"; then
    echo "CRD objects rendered although their APIs are not served"; return 1
  fi
  grep -q '^  replicas: 1$' "$out" || { echo "no replicas without the KEDA API"; return 1; }
  echo "CRD guard ok: gpu-keda without the APIs renders no KEDA/monitoring objects, replicas: 1"
  # NOTES.txt is not part of `helm template` output: render it through a copy of the chart in
  # which it is a named template, for every value set, so a NOTES error cannot reach installs.
  cp -r "$CHART" "$WORK/notes-chart"
  { echo '{{- define "checks.notes" -}}'; cat "$CHART/templates/NOTES.txt"; echo '{{- end -}}'; } \
    >"$WORK/notes-chart/templates/_checks_notes.tpl"
  rm "$WORK/notes-chart/templates/NOTES.txt"
  echo 'notes: {{ include "checks.notes" . | toJson }}' >"$WORK/notes-chart/templates/checks-notes.yaml"
  for set in "${VALUE_SETS[@]}"; do
    mapfile -t args < <(values_args "$set")
    "$HELM" template retouch "$WORK/notes-chart" "${CRD_APIS[@]}" "${args[@]}" \
      --show-only templates/checks-notes.yaml >"$WORK/notes.out" || { echo "NOTES.txt failed: $set"; return 1; }
    grep -q 'helm test retouch' "$WORK/notes.out" || { echo "NOTES.txt incomplete: $set"; return 1; }
    if grep -q 'deprecated flat name' "$WORK/notes.out"; then echo "NOTES.txt warns of a deprecated name: $set"; return 1; fi
  done
  echo "NOTES.txt renders for all ${#VALUE_SETS[@]} value sets"
  # A flat RETOUCH_<KEY> of the old layout in extraEnv gets a warning naming its new variable.
  "$HELM" template retouch "$WORK/notes-chart" --show-only templates/checks-notes.yaml \
    --set 'extraEnv[0].name=RUST_LOG' --set 'extraEnv[0].value=info' \
    --set 'extraEnv[1].name=RETOUCH_MAX_BATCH' --set 'extraEnv[1].value=2' >"$WORK/notes.out" \
    || { echo "NOTES.txt failed with extraEnv"; return 1; }
  grep -q 'extraEnv sets RETOUCH_MAX_BATCH, a deprecated flat name: use RETOUCH_ENGINE_MAX_BATCH' "$WORK/notes.out" \
    || { echo "NOTES.txt does not warn of extraEnv RETOUCH_MAX_BATCH"; return 1; }
  echo "NOTES.txt warns of deprecated flat RETOUCH_<KEY> names in extraEnv"
}

# Each case: description | expected message fragment | helm arguments (no spaces inside one).
FAILURE_CASES=(
  "grace <= shutdown_timeout|must exceed config.engine.shutdown_timeout|--set terminationGracePeriodSeconds=120"
  "grace <= longer shutdown_timeout|must exceed config.engine.shutdown_timeout|--set config.engine.shutdown_timeout=1h --set terminationGracePeriodSeconds=3000"
  "prefetch below max_batch|config.amqp.prefetch (3) must be 0|--set config.amqp.prefetch=3"
  "KEDA and HPA together|mutually exclusive: both would create|--set keda.enabled=true --set autoscaling.enabled=true"
  "no credentials|no credentials: set secrets.existingSecret|--set secrets.existingSecret="
  "existingSecret and create|secrets.create and secrets.existingSecret are mutually exclusive|--set secrets.create=true --set secrets.amqpUrl=amqp://u:p@h:5672/%2f"
  "dev Secret without AWS keys|needs secrets.awsAccessKeyId|--set secrets.existingSecret= --set secrets.create=true --set secrets.amqpUrl=amqp://u:p@h:5672/%2f"
  "dev Secret with KEDA, no management URL|needs secrets.rabbitmqManagementUrl|-f $CHART/ci/minimal-values.yaml --set keda.enabled=true"
  "GPU with device cpu|gpu.enabled=true but config.model.device|--set config.model.device=cpu"
  "device cuda without GPU|gpu.enabled=false: the container would get no GPU|--set gpu.enabled=false"
  "cuda device on the cpu image|the CPU image has no CUDA support|--set image.variant=cpu"
  "model cache outside the volume|must lie under modelCache.mountPath|--set config.model.cache_dir=/models"
  "KEDA min > max|must not exceed keda.maxReplicaCount|--set keda.enabled=true --set keda.minReplicaCount=5 --set keda.maxReplicaCount=2"
  "PDB without a bound|needs minAvailable or maxUnavailable|--set podDisruptionBudget.maxUnavailable=null"
  "schema: unknown config key|Additional property max_bacth is not allowed|--set config.engine.max_bacth=2"
  "schema: key in the wrong section|Additional property max_batch is not allowed|--set config.amqp.max_batch=2"
  "schema: unknown config section|Additional property metrics is not allowed|--set config.metrics.addr=0.0.0.0:1"
  "schema: deprecated flat config key|Additional property max_batch is not allowed|--set config.max_batch=2"
  "schema: bad duration|does not match pattern|--set config.engine.shutdown_timeout=2x"
  "schema: bad S3 duration|does not match pattern|--set config.s3.attempt_timeout=1min"
  "schema: unknown top-level key|Additional property replicas is not allowed|--set replicas=2"
  "schema: url in config.amqp|Additional property url is not allowed|--set config.amqp.url=amqp://x"
  "schema: amqp_url in config|Additional property amqp_url is not allowed|--set config.amqp_url=amqp://x"
  "schema: bad device|does not match pattern|--set config.model.device=gpu"
  "schema: bad dtype|must be one of the following|--set config.model.dtype=f64"
  "schema: prefetch above 2000|must be less than or equal to 2000|--set config.amqp.prefetch=5000"
)

check_chart_failures() {
  local case desc want rest args rc failed=0
  for case in "${FAILURE_CASES[@]}"; do
    IFS='|' read -r desc want rest <<<"$case"
    read -ra args <<<"$rest"
    rc=0
    "$HELM" template retouch "$CHART" "${CRD_APIS[@]}" "${args[@]}" >"$WORK/fail.out" 2>&1 || rc=$?
    if [ "$rc" = 0 ]; then
      echo "NOT REFUSED: $desc ($rest)"; failed=1
    elif ! grep -qiF -- "$want" "$WORK/fail.out"; then
      echo "REFUSED WITHOUT THE EXPECTED MESSAGE: $desc: wanted '$want', got:"; sed 's/^/    /' "$WORK/fail.out"; failed=1
    fi
  done
  echo "${#FAILURE_CASES[@]} invalid value sets refused with their messages"
  # The boundaries: one second above the drain timeout renders, and so does prefetch = max_batch.
  "$HELM" template retouch "$CHART" --set terminationGracePeriodSeconds=121 >/dev/null \
    || { echo "grace 121 s with shutdown_timeout 2m was refused"; failed=1; }
  echo "boundary ok: terminationGracePeriodSeconds=121 > engine.shutdown_timeout=2m renders"
  "$HELM" template retouch "$CHART" --set config.amqp.prefetch=4 >/dev/null \
    || { echo "prefetch 4 with max_batch 4 was refused"; failed=1; }
  echo "boundary ok: amqp.prefetch=4 = engine.max_batch renders"
  return "$failed"
}

check_kube_validate() {
  local kv failed=0
  for kv in "${KUBE_VERSIONS[@]}"; do
    if "$KUBE_VALIDATE" --strict --quiet -k "$kv" "$WORK/render/$kv"/*.yaml >"$WORK/kv.out" 2>&1; then
      echo "Kubernetes $kv: $(find "$WORK/render/$kv" -name '*.yaml' | wc -l) renderings valid (strict);" \
        "$(grep -c "Couldn't find schema" "$WORK/kv.out" || true) CRD objects without a bundled schema (warned)"
    else
      cat "$WORK/kv.out"; echo "Kubernetes $kv: INVALID"; failed=1
    fi
  done
  return "$failed"
}

check_chart_asserts() { "$PY" deploy/checks/chart_asserts.py "$WORK/render/${KUBE_VERSIONS[-1]}"; }

check_meta() { "$PY" deploy/checks/meta.py check --rules-out "$WORK/dashboard-queries.yml"; }

check_rules() {
  "$PROMTOOL" check rules deploy/prometheus/alerts.yml "$CHART/files/prometheus/alerts.yml"
  [ -s "$WORK/dashboard-queries.yml" ] || "$PY" deploy/checks/meta.py check --rules-out "$WORK/dashboard-queries.yml" >/dev/null
  "$PROMTOOL" check rules "$WORK/dashboard-queries.yml" | sed 's/^  SUCCESS/  SUCCESS (Grafana dashboard queries parse as PromQL)/'
  (cd deploy/prometheus && "$PROMTOOL" test rules alerts.test.yml)
  # The laptop stack's Prometheus config, with the rules where the container mounts them.
  mkdir -p "$WORK/prom/rules"
  cp deploy/compose/prometheus/prometheus.yml "$WORK/prom/"
  cp deploy/prometheus/alerts.yml "$WORK/prom/rules/"
  "$PROMTOOL" check config "$WORK/prom/prometheus.yml"
}

check_copies() {
  local a b failed=0
  for pair in "deploy/prometheus/alerts.yml $CHART/files/prometheus/alerts.yml" \
              "deploy/grafana/retouch.json $CHART/files/grafana/retouch.json"; do
    read -r a b <<<"$pair"
    if cmp -s "$a" "$b"; then echo "identical: $a = $b"
    else echo "DIFFERENT: $b is not a copy of $a (cp $a $b)"; failed=1; fi
  done
  return "$failed"
}

check_hadolint() {
  "$RETOUCH_TEST_HADOLINT" --config deploy/docker/hadolint.yaml deploy/docker/Dockerfile.cpu deploy/docker/Dockerfile.cuda
  echo "hadolint $("$RETOUCH_TEST_HADOLINT" --version | awk '{print $NF}'): Dockerfile.cpu, Dockerfile.cuda clean (failure threshold: style)"
}

# --- runner ----------------------------------------------------------------------------------

SUMMARY=()
FAILED=0
run_check() {
  local name=$1 t0 rc=0
  t0=$(rt_now)
  echo "--- $name"
  "check_${name//-/_}" >"$WORK/$name.log" 2>&1 || rc=$?
  sed 's/^/    /' "$WORK/$name.log"
  if [ "$rc" = 0 ]; then
    SUMMARY+=("$(printf '  %-15s ok      %5ss' "$name" "$(rt_since "$t0")")")
  else
    SUMMARY+=("$(printf '  %-15s FAILED  %5ss' "$name" "$(rt_since "$t0")")")
    FAILED=1
  fi
}

for c in helm-lint helm-template chart-failures kube-validate chart-asserts meta rules copies hadolint; do
  run_check "$c"
done

echo
echo "==== deploy/checks summary ($(rt_since "$T_START") s) ===="
printf '%s\n' "${SUMMARY[@]}"
if [ "$FAILED" = 0 ]; then echo "deploy checks: PASS"; else echo "deploy checks: FAIL"; fi
exit "$FAILED"

#!/usr/bin/env python3
"""Assertions on the chart's rendered manifests (what kubernetes-validate cannot know).

  chart_asserts.py RENDER_DIR

RENDER_DIR holds `helm template` outputs named after their values file: default.yaml and
<ci file name>.yaml (e.g. gpu-keda-values.yaml), rendered with
`--api-versions keda.sh/v1alpha1 --api-versions monitoring.coreos.com/v1`.

For every rendering: the worker's contract (exec args, worker.toml sections, keys and types
against config/worker.toml, grace period above engine.shutdown_timeout, probes on /healthz and /readyz, the
AMQP URL and the webhook secret from a Secret, never the ConfigMap), the security context of
every container, and writable volumes for the cache and /tmp. Per file: GPU limits, KEDA/HPA
wiring (a trigger per job queue), the PrometheusRule equal to deploy/prometheus/alerts.yml, the
PVC. Prints one line per file; exit 1 on any failure.
"""

import re
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKER_TOML = ROOT / "config" / "worker.toml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"


def duration_s(text):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+)(ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(int(n) * units[u] for n, u in parts)


def worker_key_types():
    """Maps section -> key -> Python type of config/worker.toml's defaults, including the keys
    documented commented out (`# key = value`) inside a section."""
    text = WORKER_TOML.read_text()
    types = {section: {k: type(v) for k, v in table.items()} for section, table in tomllib.loads(text).items()}
    section = None
    for line in text.splitlines():
        if m := re.match(r"^\[([a-z0-9_]+)\]\s*(#.*)?$", line):
            section = m.group(1)
        elif (m := re.match(r"^# ([a-z0-9_]+) = (.+)$", line)) and section:
            types[section].setdefault(m.group(1), type(tomllib.loads(f"x = {m.group(2)}")["x"]))
    return types


def load(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    return by_kind


def check_common(objs, key_types):
    dep = objs["Deployment"][0]
    pod = dep["spec"]["template"]["spec"]
    worker = next(c for c in pod["containers"] if c["name"] == "worker")
    assert worker["args"][:1] == ["worker"] and "command" not in worker, "worker must run the image entrypoint with args"

    cm = next(c for c in objs["ConfigMap"] if c["metadata"]["name"].endswith("-config"))
    config = tomllib.loads(cm["data"]["worker.toml"])
    assert list(config) == list(key_types), f"worker.toml sections {list(config)} != {list(key_types)}"
    for section, table in config.items():
        assert isinstance(table, dict), f"worker.toml has a flat key {section} (deprecated layout)"
        for k, v in table.items():
            assert k in key_types[section], f"worker.toml key {section}.{k} unknown to the worker"
            want = key_types[section][k]
            assert isinstance(v, want), f"worker.toml {section}.{k} = {v!r} is not {want.__name__}"
    assert "url" not in config["amqp"], "amqp.url must come from the Secret, not the ConfigMap"
    assert "secret" not in config["webhooks"], "webhooks.secret must come from the Secret, not the ConfigMap"
    engine, model = config["engine"], config["model"]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > duration_s(engine["shutdown_timeout"]), "grace period must exceed engine.shutdown_timeout"

    env = {e["name"]: e for e in worker["env"]}
    assert "secretKeyRef" in env["RETOUCH_AMQP_URL"]["valueFrom"], "RETOUCH_AMQP_URL must come from a Secret"
    if "RETOUCH_WEBHOOKS_SECRET" in env:
        assert "secretKeyRef" in env["RETOUCH_WEBHOOKS_SECRET"].get("valueFrom", {}), \
            "RETOUCH_WEBHOOKS_SECRET must come from a Secret"
    else:
        assert not config["webhooks"]["allow_hosts"], "webhooks.allow_hosts without RETOUCH_WEBHOOKS_SECRET"
    assert env["HF_HOME"]["value"].startswith(next(
        m["mountPath"] for m in worker["volumeMounts"] if m["name"] == "model-cache")), "HF_HOME outside the cache volume"

    sp = worker["startupProbe"]
    assert sp["httpGet"]["path"] in ("/healthz", "/readyz")
    assert sp["periodSeconds"] * sp["failureThreshold"] >= 600, "startup probe shorter than 10 minutes"
    assert worker["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert worker["readinessProbe"]["httpGet"]["path"] == "/readyz"
    port = int(config["metrics"]["addr"].rsplit(":", 1)[1])
    assert worker["ports"][0]["containerPort"] == port, "container port != metrics.addr"

    assert pod["securityContext"]["runAsNonRoot"] is True
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, f"{c['name']}: root FS not read-only"
        assert sc["allowPrivilegeEscalation"] is False, f"{c['name']}: privilege escalation allowed"
        assert sc["capabilities"]["drop"] == ["ALL"], f"{c['name']}: capabilities not dropped"
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/tmp" in mounts, f"{c['name']}: no writable /tmp"
    model_dir = model["cache_dir"]
    cache_mount = next(m["mountPath"] for m in worker["volumeMounts"] if m["name"] == "model-cache")
    assert model_dir.startswith(cache_mount), "model.cache_dir not on the cache volume"

    for init in pod.get("initContainers", []):
        if init["name"] == "fetch-model":
            a = init["args"]
            # The model comes from the worker's own config file (and environment), never from
            # flags that could disagree with it.
            assert a == ["fetch-model", "--config", "/etc/retouch/worker.toml"], a
            assert any(m["mountPath"] == "/etc/retouch" for m in init["volumeMounts"]), "no config mount"

    svc = objs["Service"][0]
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["ports"][0]["port"] == port
    test = objs["Pod"][0]
    assert test["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert "/healthz" in " ".join(test["spec"]["containers"][0]["command"])
    sel = dep["spec"]["selector"]["matchLabels"]
    assert not all(test["metadata"]["labels"].get(k) == v for k, v in sel.items()), "the test pod matches the worker selector"
    return dep, worker, config


def gpu_limit(worker):
    return worker["resources"].get("limits", {}).get("nvidia.com/gpu")


def main(render_dir):
    render_dir = Path(render_dir)
    key_types = worker_key_types()
    rules = yaml.safe_load(ALERTS.read_text())
    failed = 0
    files = sorted(render_dir.glob("*.yaml"))
    assert files, f"no renderings in {render_dir}"
    for f in files:
        try:
            objs = load(f)
            dep, worker, config = check_common(objs, key_types)
            notes = []
            name = f.stem
            if name in ("default", "gpu-keda-values", "hpa-values", "pvc-values"):
                assert gpu_limit(worker) == 1, "no nvidia.com/gpu limit"
                assert config["model"]["device"].startswith("cuda")
                tol = dep["spec"]["template"]["spec"]["tolerations"]
                assert any(t.get("key") == "nvidia.com/gpu" for t in tol), "no GPU toleration"
                notes.append("GPU limit + toleration")
            if name == "minimal-values":
                assert gpu_limit(worker) is None and config["model"]["device"] == "cpu"
                secret = objs["Secret"][0]
                assert "amqp-url" in secret["stringData"]
                # Values of nested sections reach the file, and the endpoint the environment.
                assert config["s3"]["endpoint"] == "http://minio.minio.svc:9000"
                assert config["engine"]["max_batch"] == 1 and config["engine"]["job_timeout"] == "30m"
                env = {e["name"]: e.get("value") for e in worker["env"]}
                assert env["AWS_ENDPOINT_URL_S3"] == config["s3"]["endpoint"]
                assert env["AWS_REGION"] == config["s3"]["region"]
                notes.append("CPU, chart Secret, [s3]/[engine] values")
            if name == "gpu-keda-values":
                assert "replicas" not in dep["spec"], "KEDA owns replicas"
                so = objs["ScaledObject"][0]
                rabbit = [t for t in so["spec"]["triggers"] if t["type"] == "rabbitmq"]
                # One trigger per job queue, alike (the HPA takes the larger need).
                assert [t["metadata"]["queueName"] for t in rabbit] == [
                    config["amqp"]["jobs_queue"], config["amqp"]["high_priority_queue"]], rabbit
                trig = rabbit[0]
                for t in rabbit:
                    md = t["metadata"]
                    assert md["protocol"] == "http" and md["mode"] == "QueueLength"
                    assert md["value"] == "16", "keda.value must win over the prefetch"
                    assert isinstance(md["value"], str) and isinstance(md["activationValue"], str)
                    assert t["authenticationRef"] == trig["authenticationRef"]
                assert so["spec"]["minReplicaCount"] == 0 and "cooldownPeriod" in so["spec"]
                assert "behavior" in so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]
                ta = objs["TriggerAuthentication"][0]
                assert ta["spec"]["secretTargetRef"][0]["parameter"] == "host"
                assert trig["authenticationRef"]["name"] == ta["metadata"]["name"]
                assert "HorizontalPodAutoscaler" not in objs
                pr = objs["PrometheusRule"][0]
                assert pr["spec"] == rules, "PrometheusRule differs from deploy/prometheus/alerts.yml"
                assert objs["ServiceMonitor"][0]["spec"]["endpoints"][0]["port"] == "metrics"
                env = {e["name"]: e for e in worker["env"]}
                assert "AWS_ACCESS_KEY_ID" not in env, "awsCredentials=false still sets AWS keys"
                ref = env["RETOUCH_WEBHOOKS_SECRET"]["valueFrom"]["secretKeyRef"]
                assert ref == {"name": "retouch-prod", "key": "webhook-secret"}, ref
                assert config["webhooks"]["allow_hosts"] == ["hooks.example.com", "*.callbacks.example.net:8443"]
                init_env = {e["name"] for c in dep["spec"]["template"]["spec"].get("initContainers", []) for e in c["env"]}
                assert "RETOUCH_WEBHOOKS_SECRET" not in init_env, "the init container needs no webhook secret"
                notes.append("KEDA http/QueueLength on both job queues, PrometheusRule == alerts.yml, "
                             "ServiceMonitor, IRSA, webhook secret from the Secret")
            if name == "hpa-values":
                assert "replicas" not in dep["spec"] and "ScaledObject" not in objs
                assert objs["HorizontalPodAutoscaler"][0]["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
                pdb = objs["PodDisruptionBudget"][0]["spec"]
                assert pdb["minAvailable"] == 1 and "maxUnavailable" not in pdb, "minAvailable must win"
                notes.append("HPA, minAvailable PDB")
            if name == "pvc-values":
                pvc = objs["PersistentVolumeClaim"][0]
                vol = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "model-cache")
                assert vol["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
                assert "ServiceAccount" not in objs
                notes.append("PVC cache, existing ServiceAccount")
            if name == "default":
                assert dep["spec"]["replicas"] == 1 and "ScaledObject" not in objs
                assert "Secret" not in objs
                assert "RETOUCH_WEBHOOKS_SECRET" not in {e["name"] for e in worker["env"]}, "webhooks are off by default"
                notes.append("fixed replicas, existing Secret")
            print(f"  ok    {f.name:26} {', '.join(notes)}")
        except (AssertionError, KeyError, StopIteration, IndexError) as e:
            failed += 1
            print(f"  FAIL  {f.name:26} {type(e).__name__}: {e}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

import json
def obj(props, required=None, closed=True, desc=None):
    o = {"type": "object", "properties": props}
    if closed:
        o["additionalProperties"] = False
    if required:
        o["required"] = required
    if desc:
        o["description"] = desc
    return o
S = lambda d=None, **kw: {"type": "string", **({"description": d} if d else {}), **kw}
I = lambda d=None, **kw: {"type": "integer", **({"description": d} if d else {}), **kw}
B = lambda d=None: {"type": "boolean", **({"description": d} if d else {})}
N = lambda d=None, **kw: {"type": "number", **({"description": d} if d else {}), **kw}
DUR = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h))+$", "description": "Duration: integer + ms|s|m|h, e.g. 250ms, 30s, 2m, 1h30m."}
OPEN = lambda d=None: {"type": "object", **({"description": d} if d else {})}
STRMAP = lambda d=None: {"type": "object", "additionalProperties": {"type": "string"}, **({"description": d} if d else {})}
ARR = lambda d=None, items=None: {"type": "array", "items": items or {"type": "object"}, **({"description": d} if d else {})}
QTY = {"anyOf": [{"type": "string", "pattern": "^[0-9]+(\\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"}, {"type": "integer", "minimum": 0}]}
NAME = {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$", "maxLength": 253}
PROBE = {"type": "object", "description": "A Kubernetes Probe (httpGet, periods, thresholds).",
         "properties": {"periodSeconds": {"type": "integer", "minimum": 1},
                        "failureThreshold": {"type": "integer", "minimum": 1},
                        "timeoutSeconds": {"type": "integer", "minimum": 1}}}

# One closed object per worker.toml section; [metrics] is derived from service.port and
# amqp.url comes from the Secret, so neither is a value.
config = obj({
    "amqp": obj({
        "jobs_exchange": S(minLength=1, maxLength=255), "jobs_routing_key": S(maxLength=255),
        "jobs_queue": S(minLength=1, maxLength=255),
        "high_priority_queue": S("Empty = no priority queue.", maxLength=255),
        "high_priority_routing_key": S(maxLength=255),
        "cancel_exchange": S(minLength=1, maxLength=255), "cancel_stream": S(minLength=1, maxLength=255),
        "cancel_retention": DUR,
        "webhook_queue": S(minLength=1, maxLength=255), "webhook_dead_queue": S(minLength=1, maxLength=255),
        "results_exchange": S(minLength=1, maxLength=255),
        "dead_letter_exchange": S(minLength=1, maxLength=255), "dead_letter_queue": S(minLength=1, maxLength=255),
        "declare_topology": B(), "delivery_limit": I(minimum=1),
        "prefetch": I("0 = 3 × engine.max_batch; otherwise at least engine.max_batch.", minimum=0, maximum=2000),
        "connection_name": S(maxLength=200),
        "reconnect_backoff_min": DUR, "reconnect_backoff_max": DUR, "publish_timeout": DUR,
    }, desc="[amqp]: broker topology and consumer (amqp.url comes from the Secret)."),
    "s3": obj({
        "endpoint": {"type": "string", "pattern": "^(https?://.+)?$"}, "region": S(),
        "force_path_style": {"type": ["boolean", "null"]},
        "connect_timeout": DUR, "operation_timeout": DUR, "attempt_timeout": DUR,
        "max_attempts": I(minimum=1),
    }, desc="[s3]: the object store (credentials never here)."),
    "engine": obj({
        "output_prefix": {"type": "string", "pattern": "^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"},
        "max_input_bytes": I(minimum=1), "max_input_pixels": I(minimum=1),
        "max_batch": I(minimum=1, maximum=64), "max_batch_wait": DUR, "job_timeout": DUR,
        "shutdown_timeout": DUR, "retry_backoff": DUR, "retry_backoff_max": DUR, "worker_name": S(),
    }, desc="[engine]: the job engine."),
    "model": obj({
        "source": S(minLength=1, pattern="^(hf:[^/\\s]+/[^\\s]+|s3://[^\\s]+|/[^\\s]*)$",
                    description="hf:OWNER/NAME[@REV], s3://bucket/prefix/ or an absolute directory."),
        "variant": S(), "cache_dir": S(pattern="^/"),
        "device": S(pattern="^(cpu|cuda(:[0-9]+)?)$"),
        "dtype": {"enum": ["auto", "f32", "f16", "bf16"]},
        "conv": {"enum": ["auto", "cudnn", "im2col"]},
        "attention": {"enum": ["auto", "flash", "math"]},
        "safety_checker": {"enum": ["auto", "on", "off", "block"],
                           "description": "auto (as diffusers), on, off or block (flagged jobs fail with error kind nsfw)."},
    }, desc="[model]: the model loader (the fields of the `retouch edit` flags)."),
    "webhooks": obj({
        "allow_hosts": ARR(items=S(minLength=1),
                           d="Host names (host, host:port, *.domain, IP literal); validation.yaml refuses schemes and paths."),
        "allow_http": B(), "timeout": DUR, "retry_for": DUR, "retry_backoff": DUR, "retry_backoff_max": DUR,
        "concurrency": I(minimum=1, maximum=256),
    }, desc="[webhooks]: the webhook relay (the secret comes from the Secret, never here)."),
}, desc="Worker configuration: the sections of worker.toml except [metrics].")

probe_obj = obj({"startup": PROBE, "liveness": PROBE, "readiness": PROBE})

schema = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "Values of the retouch chart",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "global": OPEN("Helm global values (parent charts)."),
        "nameOverride": S(), "fullnameOverride": S(),
        "image": obj({"repository": S(minLength=1), "tag": S(), "variant": {"type": "string", "enum": ["cuda", "cpu"]},
                      "digest": {"type": "string", "pattern": "^(sha256:[a-f0-9]{64})?$"},
                      "pullPolicy": {"type": "string", "enum": ["Always", "IfNotPresent", "Never"]}}),
        "imagePullSecrets": ARR(items=obj({"name": S(minLength=1)}, required=["name"])),
        "replicaCount": I(minimum=0),
        "strategy": OPEN(), "revisionHistoryLimit": I(minimum=0),
        "config": config,
        "terminationGracePeriodSeconds": I(minimum=1),
        "secrets": obj({
            "existingSecret": S(), "create": B(), "awsCredentials": B(),
            "keys": obj({"amqpUrl": S(minLength=1), "awsAccessKeyId": S(minLength=1),
                         "awsSecretAccessKey": S(minLength=1), "rabbitmqManagementUrl": S(minLength=1),
                         "webhookSecret": S("Empty: no webhook secret in existingSecret (webhooks off).")}),
            "amqpUrl": {"type": "string", "pattern": "^(amqps?://.+)?$"},
            "awsAccessKeyId": S(), "awsSecretAccessKey": S(),
            "rabbitmqManagementUrl": {"type": "string", "pattern": "^(https?://.+)?$"},
            "webhookSecret": S("whsec_<base64 key> (or bare base64); empty: webhooks off.", pattern="^\\S*$"),
        }),
        "gpu": obj({"enabled": B(), "resourceName": S(minLength=1), "count": I(minimum=1)}),
        "resources": obj({"requests": {"type": "object", "additionalProperties": QTY},
                          "limits": {"type": "object", "additionalProperties": QTY},
                          "claims": ARR()}),
        "nodeSelector": STRMAP(), "tolerations": ARR(), "affinity": OPEN(), "topologySpreadConstraints": ARR(),
        "priorityClassName": S(), "runtimeClassName": S(),
        "podAnnotations": STRMAP(), "podLabels": STRMAP(),
        "podSecurityContext": OPEN(), "securityContext": OPEN(),
        "extraEnv": ARR(items={"type": "object", "required": ["name"], "properties": {"name": S(minLength=1)}}),
        "extraEnvFrom": ARR(), "extraVolumes": ARR(), "extraVolumeMounts": ARR(),
        "tmpSizeLimit": QTY,
        "probes": probe_obj,
        "modelCache": obj({
            "mountPath": S(pattern="^/"), "sizeLimit": QTY, "medium": {"type": "string", "enum": ["", "Memory"]},
            "persistence": obj({"enabled": B(), "existingClaim": S(), "storageClassName": S(),
                                "accessModes": ARR(items={"type": "string", "enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]}),
                                "size": QTY, "annotations": STRMAP()}),
            "prefetch": obj({"enabled": B(), "offline": B(),
                             "resources": obj({"requests": {"type": "object", "additionalProperties": QTY},
                                               "limits": {"type": "object", "additionalProperties": QTY}})}),
        }),
        "serviceAccount": obj({"create": B(), "name": S(), "annotations": STRMAP(), "labels": STRMAP(),
                               "automountServiceAccountToken": B()}),
        "service": obj({"type": {"type": "string", "enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                        "port": I(minimum=1, maximum=65535), "annotations": STRMAP()}),
        "metrics": obj({
            "serviceMonitor": obj({"enabled": B(), "interval": DUR, "scrapeTimeout": DUR, "labels": STRMAP(),
                                   "relabelings": ARR(), "metricRelabelings": ARR()}),
            "prometheusRule": obj({"enabled": B(), "labels": STRMAP()}),
            "grafanaDashboard": obj({"enabled": B(), "labels": STRMAP(), "annotations": STRMAP()}),
        }),
        "keda": obj({
            "enabled": B(), "minReplicaCount": I(minimum=0), "maxReplicaCount": I(minimum=1),
            "pollingInterval": I(minimum=1), "cooldownPeriod": I(minimum=0),
            "value": N(minimum=0), "activationValue": N(minimum=0), "vhostName": S(),
            "behavior": OPEN("autoscaling/v2 HorizontalPodAutoscalerBehavior."),
            "fallbackReplicas": I(minimum=0), "extraTriggers": ARR(),
        }),
        "autoscaling": obj({"enabled": B(), "minReplicas": I(minimum=1), "maxReplicas": I(minimum=1),
                            "metrics": ARR(), "behavior": OPEN()}),
        "podDisruptionBudget": obj({"enabled": B(),
                                    "maxUnavailable": {"type": ["integer", "string", "null"]},
                                    "minAvailable": {"type": ["integer", "string", "null"]}}),
        "tests": obj({"image": S(minLength=1),
                      "resources": obj({"requests": {"type": "object", "additionalProperties": QTY},
                                        "limits": {"type": "object", "additionalProperties": QTY}})}),
    },
}
print(json.dumps(schema, indent=2))

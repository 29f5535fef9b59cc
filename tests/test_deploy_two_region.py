"""The two-region deployment example (``deploy/two-region``) checked without Docker or a cluster:
the compose file and the Kubernetes manifests parse, and every app server's endpoint keys are
what the SDK reads and name the relays of the same file.

* compose.yaml: interpolated as ``docker compose`` does (``${VAR}``, ``${VAR:?message}``,
  ``${VAR:-default}``, ``$$``) with test keys; each app server's environment goes through
  ``ServiceOptions.from_env``: its own region's relay as the primary, the other as the
  secondary, each endpoint a relay service of the file (name and port), with that relay's
  access key, the relay's public endpoint as the token audience, and its published port as
  the ``ClientEndpoint``.
* k8s/*.yaml: every document a well-formed object in its region's namespace, selectors that
  match, Service ports that exist; each container's environment resolved as the kubelet does
  (``secretKeyRef``, ``configMapKeyRef``, ``fieldRef``, ``$(VAR)`` of variables defined above),
  then the same endpoint checks against the relay Services and Deployments.
* The images: both Dockerfiles named by the compose file exist; the relay image installs
  relaycore with its declared dependencies only, so the relay must import with those.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from relaycore.protocol import ConnectionString
from relaycore.sdk import EndpointType, ServiceEndpoint, ServiceOptions

yaml = pytest.importorskip("yaml", reason="these checks read YAML: pip install pyyaml")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy" / "two-region"
COMPOSE = DEPLOY / "compose.yaml"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
REGIONS = ("east", "west")
KEYS = {"EAST_ACCESS_KEY": "test-east-key-0123456789abcdefghijklmnop",
        "WEST_ACCESS_KEY": "test-west-key-0123456789abcdefghijklmnop",
        "ADMIN_KEY": "test-admin-key-0123456789abcdefghijklmno"}


def other(region: str) -> str:
    return "west" if region == "east" else "east"


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def endpoints_of(env: dict[str, str], where: str) -> dict[str, ServiceEndpoint]:
    """The app server's endpoints as the SDK reads them, by name; only the endpoint keys
    (nothing else in its environment is Azure configuration)."""
    options = ServiceOptions.from_env(env)
    endpoints = options.all_endpoints()
    assert options.connection_string is None, where
    named = {e.name: e for e in endpoints}
    assert len(named) == len(endpoints), f"{where}: unnamed or duplicate endpoints {endpoints}"
    return named


def check_roles(endpoints: dict[str, ServiceEndpoint], region: str, where: str) -> None:
    assert set(endpoints) == set(REGIONS), f"{where}: endpoints {sorted(endpoints)}"
    assert endpoints[region].type is EndpointType.PRIMARY, where
    assert endpoints[other(region)].type is EndpointType.SECONDARY, where


# -- compose ------------------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
                       r"(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation of every string in the parsed file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op is not None and op.endswith("?") and unset:
            raise LookupError(f"required variable {name} is missing: {arg}")
        if op is not None and op.endswith("-") and unset:
            return arg
        return current or ""

    result = _VARIABLE.sub(substitute, value)
    assert "${" not in result, f"uninterpolated: {value!r}"
    return result


def load_compose(env: dict[str, str]) -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env)


def dockerfile_env(path: Path) -> dict[str, str]:
    """``ENV A=1 B=2`` lines of a Dockerfile."""
    found: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.startswith("ENV "):
            found.update(item.split("=", 1) for item in line[4:].split())
    return found


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_parses_and_builds_the_relay_from_deploy_dockerfile() -> None:
    services = load_compose(KEYS)["services"]
    assert set(services) == {"relay-east", "relay-west", "app-east", "app-west"}
    for name, service in services.items():
        build = service["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == REPO, (name, context)
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), (name, dockerfile)
        if name.startswith("relay-"):
            assert dockerfile == REPO / "deploy" / "Dockerfile", name
    # The app image copies what it needs from the repository, and its ignore file lets it.
    app_dockerfile = DEPLOY / "app.Dockerfile"
    for line in app_dockerfile.read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source
                assert f"!{source}" in (DEPLOY / "app.Dockerfile.dockerignore").read_text(), source


def test_compose_requires_the_access_keys() -> None:
    for missing in KEYS:
        env = {k: v for k, v in KEYS.items() if k != missing}
        with pytest.raises(LookupError, match=missing):
            load_compose(env)


@pytest.mark.parametrize("region", REGIONS)
def test_compose_app_server_endpoints_name_the_relays_of_the_file(region: str) -> None:
    services = load_compose(KEYS)["services"]
    image_env = dockerfile_env(REPO / "deploy" / "Dockerfile")
    where = f"compose service app-{region}"
    app_env = environment(services[f"app-{region}"])
    endpoints = endpoints_of(app_env, where)
    check_roles(endpoints, region, where)
    assert f"relay-{region}" in services[f"app-{region}"].get("depends_on", []), where
    for name, endpoint in endpoints.items():
        relay = services[f"relay-{name}"]
        relay_env = {**image_env, **environment(relay)}
        connection = endpoint.connection
        # The app server reaches the relay by its service name and the port it listens on.
        assert host_port(connection.server_base) == (f"relay-{name}",
                                                     int(relay_env["RELAYCORE_PORT"])), where
        assert endpoint.access_key == relay_env["RELAYCORE_ACCESS_KEY"] == \
            KEYS[f"{name.upper()}_ACCESS_KEY"], where
        # Tokens are signed for the Endpoint host: the relay must take it as its own.
        assert host_port(relay_env["RELAYCORE_PUBLIC_ENDPOINT"]) == host_port(
            connection.connection_base), where
        # Browsers are sent to the relay's published port on this machine.
        published = {int(p.split(":")[0]): int(p.split(":")[1]) for p in relay["ports"]}
        client_host, client_port = host_port(connection.client_base)
        assert client_host == "localhost", where
        assert published.get(client_port) == int(relay_env["RELAYCORE_PORT"]), where
    assert app_env["POD_NAME"] == f"app-{region}"
    # The example page's "pod 2" is port 8002 of its host: app-west, seen from app-east.
    published_app = [p.split(":") for p in services[f"app-{region}"]["ports"]]
    assert published_app == [[{"east": "8001", "west": "8002"}[region], "8000"]]


# -- Kubernetes ---------------------------------------------------------------------------------


def load_manifests() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def find(docs: list[tuple[Path, dict[str, Any]]], kind: str, namespace: str,
         name: str) -> dict[str, Any]:
    found = [d for _, d in docs if d["kind"] == kind and d["metadata"]["name"] == name
             and d["metadata"].get("namespace") == namespace]
    assert len(found) == 1, f"{kind} {namespace}/{name}: {len(found)} found"
    return found[0]


def secret_value(secret: dict[str, Any], key: str) -> str:
    if key in secret.get("stringData", {}):
        return str(secret["stringData"][key])
    return base64.b64decode(secret["data"][key]).decode()


def resolve_env(docs: list[tuple[Path, dict[str, Any]]], namespace: str,
                container: dict[str, Any], pod_name: str) -> dict[str, str]:
    """A container's environment as the kubelet builds it."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        name = item["name"]
        if "value" in item:
            def expand(match: re.Match[str]) -> str:
                if match.group(0) == "$$":
                    return "$"
                assert match.group(1) in env, f"$({match.group(1)}) is used before defined"
                return env[match.group(1)]
            env[name] = re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, item["value"])
            continue
        source = item["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            env[name] = secret_value(find(docs, "Secret", namespace, ref["name"]), ref["key"])
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[name] = str(find(docs, "ConfigMap", namespace, ref["name"])["data"][ref["key"]])
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.name", source
            env[name] = pod_name
        else:
            raise AssertionError(f"unexpected valueFrom {source}")
    return env


def test_manifests_are_well_formed_objects_one_namespace_per_region() -> None:
    docs = load_manifests()
    assert [p.name for p in MANIFESTS] == ["east.yaml", "west.yaml"]
    for path, doc in docs:
        region = path.stem
        namespace = f"relaycore-{region}"
        assert {"apiVersion", "kind", "metadata"} <= set(doc), (path, doc)
        labels = doc["metadata"].get("labels", {})
        assert labels.get("relaycore.dev/region") == region, (path, doc["metadata"])
        if doc["kind"] == "Namespace":
            assert doc["metadata"]["name"] == namespace
        else:
            assert doc["metadata"]["namespace"] == namespace, (path, doc["metadata"])
    kinds = sorted((p.stem, d["kind"], d["metadata"]["name"]) for p, d in docs)
    for region in REGIONS:
        assert [k[1:] for k in kinds if k[0] == region] == sorted([
            ("Namespace", f"relaycore-{region}"), ("Secret", "relay-keys"),
            ("ConfigMap", "relay-endpoints"), ("Deployment", "relay"), ("Service", "relay"),
            ("Deployment", "app"), ("Service", "app")])
        # Each file creates its namespace before anything in it.
        first = next(d for p, d in docs if p.stem == region)
        assert first["kind"] == "Namespace"


def test_manifest_selectors_and_ports_match() -> None:
    docs = load_manifests()
    for path, service in docs:
        if service["kind"] != "Service":
            continue
        namespace = service["metadata"]["namespace"]
        deployments = [d for _, d in docs if d["kind"] == "Deployment"
                       and d["metadata"]["namespace"] == namespace
                       and service["spec"]["selector"].items()
                       <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(deployments) == 1, (path, service["metadata"]["name"])
        (deployment,) = deployments
        spec = deployment["spec"]
        assert spec["selector"]["matchLabels"].items() <= \
            spec["template"]["metadata"]["labels"].items()
        ports = {p["name"] for c in spec["template"]["spec"]["containers"]
                 for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, (path, port)
        for container in spec["template"]["spec"]["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                if probe in container:
                    assert container[probe]["httpGet"]["port"] in ports, (path, probe)


@pytest.mark.parametrize("region", REGIONS)
def test_manifest_app_server_endpoints_name_the_relays_of_the_manifests(region: str) -> None:
    docs = load_manifests()
    namespace = f"relaycore-{region}"
    app = find(docs, "Deployment", namespace, "app")
    (container,) = app["spec"]["template"]["spec"]["containers"]
    where = f"Deployment {namespace}/app"
    app_env = resolve_env(docs, namespace, container, "app-7d4b9c-x2x7q")
    endpoints = endpoints_of(app_env, where)
    check_roles(endpoints, region, where)
    assert app_env["POD_NAME"] == "app-7d4b9c-x2x7q"
    for name, endpoint in endpoints.items():
        # Endpoint: the relay Service of that region's namespace, on a port it serves.
        host, port = host_port(endpoint.connection.server_base)
        service_name, service_namespace, *rest = host.split(".")
        assert rest == ["svc", "cluster", "local"], (where, host)
        assert service_namespace == f"relaycore-{name}", (where, host)
        service = find(docs, "Service", service_namespace, service_name)
        assert port in [p["port"] for p in service["spec"]["ports"]], (where, host, port)
        relay = find(docs, "Deployment", service_namespace, "relay")
        assert service["spec"]["selector"].items() <= \
            relay["spec"]["template"]["metadata"]["labels"].items()
        (relay_container,) = relay["spec"]["template"]["spec"]["containers"]
        relay_env = resolve_env(docs, service_namespace, relay_container, "relay-0")
        # The same key on both sides (each namespace holds its own copy of the Secret).
        assert endpoint.access_key == relay_env["RELAYCORE_ACCESS_KEY"], where
        assert host_port(relay_env["RELAYCORE_PUBLIC_ENDPOINT"]) == (host, port), where
        assert endpoint.connection.client_endpoint is not None, where
        # The relay listens where the Service sends it (the image's RELAYCORE_PORT).
        image_env = dockerfile_env(REPO / "deploy" / "Dockerfile")
        container_ports = {p["name"]: p["containerPort"] for p in relay_container["ports"]}
        target = next(p["targetPort"] for p in service["spec"]["ports"] if p["port"] == port)
        assert container_ports[target] == int(
            relay_env.get("RELAYCORE_PORT", image_env["RELAYCORE_PORT"]))


def test_connection_strings_of_the_readme_parse() -> None:
    """The failover rehearsal's connection string (README) reaches relay-east's published
    port and signs for the host it is addressed to."""
    text = (DEPLOY / "README.md").read_text()
    (east,) = set(re.findall(r'EAST="(Endpoint=[^"]+)"', text))
    parsed = ConnectionString.parse(east.replace("$EAST_ACCESS_KEY", KEYS["EAST_ACCESS_KEY"]))
    assert host_port(parsed.server_base) == ("localhost", 8081)


# -- images -------------------------------------------------------------------------------------


def test_the_relay_imports_with_its_declared_dependencies_only() -> None:
    """Block every package of the ``dev`` extra that is not a declared dependency, then
    import what the relay image runs."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("-", "_")
                for r in requirements}

    blocked = sorted(names(project["optional-dependencies"]["dev"])
                     - names(project["dependencies"]))
    code = (f"import sys\nfor name in {blocked!r}: sys.modules[name] = None\n"
            "import relaycore.__main__, relaycore.relay\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]

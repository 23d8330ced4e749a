"""deploy/k8s: every manifest, as kustomize renders the base and the GPU overlay, against the
Kubernetes API schemas that kubernetes-validate ships, and the graph between them (probes,
Services, the frontend's stage addresses, GPUs). No cluster needed."""

import copy
import json
import pathlib
import re
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from tests.test_deploy_compose import check_command_line, options

ROOT = pathlib.Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = {"cpu": K8S, "gpu": K8S / "gpu"}
# Native gRPC probes are GA since 1.27; the newest version the package knows, too.
VERSIONS = ["1.27", kubernetes_validate.latest_version()]
STAGE_PORTS = {"tokenizer": 50051, "prefill": 50052, "decode": 50053}
MODULES = {"frontend": "frontend", **{s: f"services.{s}" for s in STAGE_PORTS}}


def read_yaml(path: pathlib.Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def merge(base, patch):
    """Strategic merge as kustomize applies it to the fields these patches touch: maps merge,
    lists of named maps (containers, volumes, env) merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    named = isinstance(base, list) and isinstance(patch, list)
    if named and all(isinstance(item, dict) and "name" in item for item in base + patch):
        merged = list(base)
        names = [item["name"] for item in base]
        for item in patch:
            if item["name"] in names:
                index = names.index(item["name"])
                merged[index] = merge(merged[index], item)
            else:
                merged.append(copy.deepcopy(item))
        return merged
    return copy.deepcopy(patch)


def render(directory: pathlib.Path) -> list[dict]:
    """The subset of kustomize that deploy/k8s uses: resources and patches from files."""
    (kustomization,) = read_yaml(directory / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert set(kustomization) <= {"apiVersion", "kind", "resources", "patches"}
    objects = []
    for entry in kustomization["resources"]:
        path = directory / entry
        objects += render(path) if path.is_dir() else read_yaml(path)
    for entry in kustomization.get("patches", []):
        assert set(entry) == {"path"}, entry  # target taken from the patch's kind and name
        for patch in read_yaml(directory / entry["path"]):
            key = (patch["kind"], patch["metadata"]["name"])
            (index,) = [i for i, o in enumerate(objects) if identity(o) == key]
            objects[index] = merge(objects[index], patch)
    return objects


def identity(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def port_number(container_spec: dict, port) -> int:
    ports = {p.get("name"): p["containerPort"] for p in container_spec["ports"]}
    number = ports.get(port, port)
    assert number in ports.values(), f"{port} is not a port of {container_spec['name']}"
    return number


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(OVERLAYS[request.param])


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_valid(rendered, version):
    _, objects = rendered
    assert objects
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_base_file_valid(version):
    files = sorted((K8S / "base").glob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        for obj in read_yaml(path):
            if obj["kind"] != "Kustomization":
                kubernetes_validate.validate(obj, version, strict=True)


def test_deployments(rendered):
    _, objects = rendered
    deployments = by_kind(objects, "Deployment")
    assert set(deployments) == set(MODULES)
    config = by_kind(objects, "ConfigMap")
    for name, deployment in deployments.items():
        spec = deployment["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items(), name
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        c = container(deployment)
        assert c["command"] == ["python", "-m", MODULES[name]], name
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
        assert c["resources"]["requests"] and c["resources"]["limits"], name
        args = options(c["args"])
        assert args["--host"] == "0.0.0.0", name
        served = int(args["--port"])
        assert served == STAGE_PORTS.get(name, 8000), name
        # $(VAR) in the args must come from the ConfigMap the container loads.
        sources = [ref["configMapRef"]["name"] for ref in c.get("envFrom", [])]
        defined = {k for s in sources for k in config[s]["data"]}
        defined |= {e["name"] for e in c.get("env", [])}
        for variable in re.findall(r"\$\((\w+)\)", " ".join(c["args"])):
            assert variable in defined, (name, variable)
        probes = {k: c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe") if k in c}
        assert {"readinessProbe", "livenessProbe"} <= set(probes), name
        for kind, probe in probes.items():
            if name == "frontend" and kind == "readinessProbe":
                assert probe["httpGet"]["path"] == "/health"
            if name != "frontend":
                assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}
            handler = probe.get("grpc") or probe.get("httpGet") or probe.get("tcpSocket")
            assert port_number(c, handler["port"]) == served, (name, kind)
        if name != "frontend":
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert mounts["/models"]["readOnly"] is True, name


def test_commands_parse(rendered):
    _, objects = rendered
    (config,) = by_kind(objects, "ConfigMap").values()
    env = config["data"]
    for deployment in by_kind(objects, "Deployment").values():
        c = container(deployment)
        args = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in c["args"]]
        check_command_line(c["command"][2], args)


def test_services_select_deployments(rendered):
    _, objects = rendered
    deployments = by_kind(objects, "Deployment")
    services = by_kind(objects, "Service")
    assert set(services) == set(MODULES)
    for name, service in services.items():
        selector = service["spec"]["selector"]
        matched = [
            d
            for d, deployment in deployments.items()
            if selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert matched == [name], name
        headless = service["spec"].get("clusterIP") == "None"
        assert headless == (name in STAGE_PORTS), name  # DNS gives the frontend every pod
        (port,) = service["spec"]["ports"]
        target = port_number(container(deployments[name]), port.get("targetPort", port["port"]))
        # A headless name resolves to pod addresses: clients dial the container port itself.
        assert port["port"] == target == STAGE_PORTS.get(name, 8000), name


def test_frontend_names_the_stage_services(rendered):
    _, objects = rendered
    services = by_kind(objects, "Service")
    args = options(container(by_kind(objects, "Deployment")["frontend"])["args"])
    for stage, port in STAGE_PORTS.items():
        assert args[f"--{stage}"] == f"{stage}:{port}"
        assert services[stage]["spec"]["ports"][0]["port"] == port


def test_gpu_overlay():
    cpu = by_kind(render(OVERLAYS["cpu"]), "Deployment")
    gpu = by_kind(render(OVERLAYS["gpu"]), "Deployment")
    for name in ("prefill", "decode"):
        c = container(gpu[name])
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert c["resources"]["requests"]["nvidia.com/gpu"] == "1"
        assert options(c["args"])["--device"] == "cuda"
        assert c["image"].endswith(":cuda")
        assert options(container(cpu[name])["args"])["--device"] == "cpu"
        assert "nvidia.com/gpu" not in container(cpu[name])["resources"]["limits"]
    for name in ("tokenizer", "frontend"):
        assert gpu[name] == cpu[name]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_render_matches_kustomize(overlay):
    """The rendering above is what `kubectl kustomize` produces, where kubectl is at hand."""
    output = subprocess.run(
        ["kubectl", "kustomize", str(OVERLAYS[overlay])],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout

    def canonical(objects: list[dict]) -> list[str]:
        return sorted(json.dumps(o, sort_keys=True) for o in objects)

    expected = [doc for doc in yaml.safe_load_all(output) if doc]
    assert canonical(render(OVERLAYS[overlay])) == canonical(expected)

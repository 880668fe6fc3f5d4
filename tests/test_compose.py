"""docker-compose.yml and the Dockerfiles, checked without a Docker engine: the compose file
against the Compose Specification's JSON schema, then both against the rules we deploy by."""

from __future__ import annotations

import json
import re
from importlib import resources

import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from convoy.orchestrator.parser import build_parser
from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.gpu"]
ENV = {"REDIS_PASSWORD": "pw", "FLOWER_BASIC_AUTH": "admin:secret"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?([-?])([^}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}``, as `docker compose` does."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        name, op, arg = m.groups()
        if env.get(name):
            return env[name]
        if op == "?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == "-" else ""

    return _VAR.sub(one, value.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(raw) -> dict:
    return interpolate(raw, ENV)


def _schema() -> dict:
    # The official compose-spec schema, as vendored (and kept current) by check-jsonschema.
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def test_compose_file_follows_the_compose_specification(compose):
    schema = _schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_schema_catches_a_broken_file(compose):
    schema = _schema()
    broken = json.loads(json.dumps(compose))
    broken["services"]["redis"]["stop_grace_period"] = {"seconds": 30}
    assert list(jsonschema.validators.validator_for(schema)(schema).iter_errors(broken))


def test_secrets_are_required_not_defaulted(raw):
    for name in ("REDIS_PASSWORD", "FLOWER_BASIC_AUTH"):
        with pytest.raises(KeyError, match=name):
            interpolate(raw, {k: v for k, v in ENV.items() if k != name})


def _seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text))


def _workers(compose: dict) -> dict:
    return {n: s for n, s in compose["services"].items() if n.startswith("worker-")}


def test_every_worker_shuts_down_warm_and_reports_health(compose):
    workers = _workers(compose)
    assert set(workers) == {"worker-extract", "worker-cam", "worker-train"}
    for name, svc in workers.items():
        cmd = svc["command"]
        assert isinstance(cmd, list) and cmd[:2] == ["convoy", "worker"], name  # exec form, no shell
        assert svc["stop_signal"] == "SIGTERM" and _seconds(svc["stop_grace_period"]) >= 60, name
        worker_name = cmd[cmd.index("--hostname") + 1]
        health = svc["healthcheck"]["test"]
        assert health[0] == "CMD" and health[1:5] == ["convoy", "workers", "--ping", worker_name], name
        queue = name.removeprefix("worker-")
        assert cmd[cmd.index("--queues") + 1] == queue and cmd[cmd.index("--concurrency") + 1] == "1"


def test_every_convoy_command_parses_with_our_cli(compose):
    for svc in compose["services"].values():
        commands = [svc.get("command") or []] + [svc.get("healthcheck", {}).get("test", [])[1:]]
        for cmd in commands:
            if cmd[:1] == ["convoy"] and "--help" not in cmd:
                build_parser().parse_args(cmd[1:])  # exits 2 on an unknown option


def test_extract_workers_reserve_one_nvidia_gpu(compose):
    svc = compose["services"]["worker-extract"]
    [device] = svc["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert device.get("count") == 1 or len(device.get("device_ids", [])) == 1
    assert svc["build"]["dockerfile"] == "docker/Dockerfile.gpu"


def test_workers_share_data_and_outputs_at_the_same_paths(compose):
    for name in [*_workers(compose), "orchestrator"]:
        svc = compose["services"][name]
        targets = {v.split(":")[1] for v in svc["volumes"]}
        assert {"/data", "/outputs"} <= targets, name
        assert svc["environment"]["CONVOY_BROKER_URL"] == "redis://:pw@redis:6379/0", name


def test_redis_persists_has_a_password_and_never_evicts(compose, raw):
    redis = compose["services"]["redis"]
    assert redis["command"][:2] == ["sh", "-c"]
    script = redis["command"][2]
    args = script.split("redis-server -", 1)[1].split()
    option = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
    assert option["--appendonly"] == "yes" and option["--maxmemory-policy"] == "noeviction"
    # The password comes on stdin from the environment, never as an argument.
    assert "printf 'requirepass %s\\n' \"$REDIS_PASSWORD\" |" in script and "pw" not in script, script
    assert redis["environment"]["REDIS_PASSWORD"] == "pw"
    assert "REDIS_PASSWORD:?" in raw["services"]["redis"]["environment"]["REDIS_PASSWORD"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_flower_has_a_login_and_persistent_state(compose, raw):
    flower = compose["services"]["flower"]
    assert flower["command"][:2] == ["convoy", "flower"] and "--db" in flower["command"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == "admin:secret"
    assert "--insecure-no-auth" not in flower["command"]
    db_dir = flower["command"][flower["command"].index("--db") + 1].rsplit("/", 1)[0]
    assert any(v.endswith(f":{db_dir}") for v in flower["volumes"])
    assert any(p.endswith(":5555") for p in flower["ports"])


def test_one_metrics_exporter_and_an_optional_prometheus_that_keeps_its_labels(compose):
    exporter = compose["services"]["metrics"]
    cmd = exporter["command"]
    assert cmd[:2] == ["convoy", "metrics"] and "profiles" not in exporter
    assert not any(name != "metrics" and "metrics" in (svc.get("command") or [])[:2]
                   for name, svc in compose["services"].items()), "workers serve no metrics of their own"
    prometheus = compose["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    source, target, _mode = next(v for v in prometheus["volumes"] if v.endswith(":ro")).split(":")
    config = yaml.safe_load((ROOT / source).read_text())
    assert target == next(a for a in prometheus["command"] if a.startswith("--config.file=")).split("=", 1)[1]
    (scrape,) = config["scrape_configs"]
    assert scrape["honor_labels"] is True  # the exporter's `job` label is a Convoy job id
    assert scrape["static_configs"][0]["targets"] == [f"metrics:{cmd[cmd.index('--port') + 1]}"]


def test_orchestrator_is_one_shot(compose):
    cli = compose["services"]["orchestrator"]
    assert cli["profiles"] and cli["restart"] == "no"


# --- Dockerfiles ------------------------------------------------------------------------

def _instructions(path) -> dict[str, list[str]]:
    with open(path, "rb") as f:
        parser = DockerfileParser(fileobj=f)
        structure = parser.structure
    found: dict[str, list[str]] = {}
    for item in structure:
        found.setdefault(item["instruction"], []).append(item["value"])
    return found


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_rules(path):
    found = _instructions(path)
    [cmd] = found["CMD"]
    argv = json.loads(cmd)  # exec form: TERM reaches the worker, not a shell
    assert argv[:2] == ["convoy", "worker"]
    build_parser().parse_args(argv[1:])
    [health] = found["HEALTHCHECK"]
    health_argv = json.loads(health[health.index("CMD") + 3:].strip())
    assert health_argv[:3] == ["convoy", "workers", "--ping"]
    assert found["STOPSIGNAL"] == ["SIGTERM"]
    assert found["USER"][-1] not in ("root", "0")
    assert all(":" in image and not image.endswith(":latest") for image in found["FROM"])
    for src in " ".join(found["COPY"]).split():
        assert (ROOT / src).exists() or src.startswith("./") or src == ".", src


def test_gpu_image_installs_tensorflow_with_cuda_and_no_cpu_build():
    text = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    assert "tensorflow[and-cuda]" in text and "not d.startswith('tensorflow')" in text


def test_redis_flower_and_metrics_are_published_on_loopback_by_default(compose):
    """Threat model: nothing is open to the network until the operator opens it."""
    for name in ("redis", "flower", "metrics", "prometheus"):
        ports = compose["services"][name]["ports"]
        assert ports and all(str(p).startswith("127.0.0.1:") for p in ports), (name, ports)

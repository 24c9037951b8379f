"""The deploy files parse and agree with each other and with the daemon's settings.

No Docker or cluster here: these tests read the files and check what a reviewer would
check by hand (image tags, entrypoints, probes, shared /dev/shm, socket paths, grace
periods longer than the drain), so a renamed flag or a bumped version fails in CI rather
than in a cluster.
"""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from ckptd.daemon.config import SETTINGS, DaemonConfig, env_name
from deploy_files import (
    DEPLOY,
    DOCKERFILE,
    INSTALL_SCRIPT,
    REPO,
    TRAINER_DOCKERFILE,
    Stage,
    build_context_copies,
    project_version,
    read_dockerfile,
)

K8S = DEPLOY / "k8s"
VERSION = project_version()
DAEMON_IMAGES = {f"ckptd:{VERSION}", f"ckptd:{VERSION}-s3"}
TRAINER_IMAGE = f"ckptd-trainer:{VERSION}"
UID = 10001
# Settings the daemon reads from CKPTD_* (CKPTD_METRICS_LISTEN among them).
KNOWN_ENV = {env_name(name) for name in SETTINGS}
DEFAULT_DRAIN_S = DaemonConfig(storage_url="unused").drain_timeout_s
HEALTHCHECK_MODULE = "ckptd.daemon.server.healthcheck"


def yaml_files() -> list[Path]:
    return sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))


def k8s_docs() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in load_all(path)]


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def config_map_env() -> dict[str, str]:
    (config,) = [d for d in k8s_docs() if d["kind"] == "ConfigMap"]
    return {key: str(value) for key, value in config["data"].items()}


def drain_timeout_s(env: dict[str, str]) -> float:
    return float(env.get("CKPTD_DRAIN_TIMEOUT_S", DEFAULT_DRAIN_S))


# Dockerfiles -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def final_stage() -> Stage:
    return read_dockerfile(DOCKERFILE)[-1]


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.args("ENV"):
        env.update(dict(re.findall(r"(\w+)=(\S+)", args)))
    return env


def test_image_is_multi_stage_on_slim_python(final_stage: Stage) -> None:
    stages = read_dockerfile(DOCKERFILE)
    assert len(stages) >= 2
    assert final_stage.base == "python:3.11-slim"
    copies = [args for args in final_stage.args("COPY") if args.startswith("--from=")]
    assert copies == [f"--from={stages[0].name} /opt/ckptd /opt/ckptd"]
    assert env_of(final_stage)["PATH"].startswith("/opt/ckptd/bin:")


def test_build_stage_installs_with_the_tested_script() -> None:
    build = read_dockerfile(DOCKERFILE)[0]
    copied = dict(build_context_copies(build))
    assert copied["deploy/install-daemon.sh"] == "deploy/install-daemon.sh"
    (install,) = [run for run in build.args("RUN") if "install-daemon.sh" in run]
    assert "sh deploy/install-daemon.sh /opt/ckptd /src" in install
    assert INSTALL_SCRIPT.read_text().startswith("#!/bin/sh\n")


def test_final_stage_installs_nothing_and_has_no_torch(final_stage: Stage) -> None:
    for keyword, args in final_stage.instructions:
        assert "torch" not in args.lower(), (keyword, args)
        if keyword == "RUN":
            assert not re.search(r"pip\b|apt-get|apt |gcc|build-essential", args), args
    for stage in read_dockerfile(DOCKERFILE):  # the build stage neither
        assert not any("torch" in args.lower() for _, args in stage.instructions)


def test_final_stage_runs_ckptd_serve_as_non_root(final_stage: Stage) -> None:
    (user,) = final_stage.args("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert user == f"{UID}:{UID}"
    (entrypoint,) = final_stage.args("ENTRYPOINT")
    assert json.loads(entrypoint) == ["ckptd", "serve"]
    assert final_stage.args("VOLUME") == ["/var/lib/ckptd"]
    assert set(final_stage.args("EXPOSE")[0].split()) == {"50051", "9100"}
    env = env_of(final_stage)
    assert env["CKPTD_STORAGE"] == "/var/lib/ckptd"
    assert env["CKPTD_LISTEN"] == "0.0.0.0:50051"
    assert env["CKPTD_METRICS_LISTEN"] == "0.0.0.0:9100"
    assert {k for k in env if k.startswith("CKPTD_")} <= KNOWN_ENV


def test_healthcheck_uses_the_grpc_health_module(final_stage: Stage) -> None:
    (healthcheck,) = final_stage.args("HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    assert json.loads(command)[:3] == ["python", "-m", HEALTHCHECK_MODULE]
    timeout_s = int(re.search(r"--timeout=(\d+)s", options).group(1))  # type: ignore[union-attr]
    probe_timeout_s = float(json.loads(command)[json.loads(command).index("--timeout-s") + 1])
    assert probe_timeout_s < timeout_s


def test_trainer_image_runs_the_example_as_the_daemon_uid() -> None:
    final = read_dockerfile(TRAINER_DOCKERFILE)[-1]
    assert final.args("USER") == [f"{UID}:{UID}"]
    (entrypoint,) = final.args("ENTRYPOINT")
    script = json.loads(entrypoint)[1]
    copies = dict(build_context_copies(final))
    assert copies["deploy/example_trainer.py"] == script
    assert (REPO / "deploy/example_trainer.py").is_file()


def ignore_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    for token in re.split(r"(\*\*/|\*|\?)", pattern.strip("/")):
        out += {"**/": "(?:.*/)?", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
    return re.compile(out)


def in_build_context(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (last matching pattern wins; a pattern that
    matches a parent directory matches the path)."""
    kept = True
    lines = (REPO / ".dockerignore").read_text().splitlines()
    for line in (raw.strip() for raw in lines):
        if not line or line.startswith("#"):
            continue
        regex = ignore_regex(line.lstrip("!"))
        parts = PurePosixPath(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            kept = line.startswith("!")
    return kept


def test_dockerignore_keeps_what_the_dockerfiles_copy_and_drops_the_rest() -> None:
    for dockerfile in (DOCKERFILE, TRAINER_DOCKERFILE):
        for stage in read_dockerfile(dockerfile):
            for source, _ in build_context_copies(stage):
                assert in_build_context(source.rstrip("/")), (dockerfile.name, source)
    assert in_build_context("daemon/server.py")
    for junk in (".venv/bin/python", "tests/conftest.py", ".git/HEAD", "bench/codec.py",
                 "daemon/__pycache__/server.cpython-311.pyc", "ckptd.egg-info/PKG-INFO"):
        assert not in_build_context(junk), junk


# Compose ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = load_all(DEPLOY / "compose.yaml")
    return doc


def test_every_yaml_file_parses() -> None:
    assert yaml_files(), "no YAML under deploy/"
    for path in yaml_files():
        assert load_all(path), path


def test_compose_builds_from_existing_dockerfiles(compose: dict[str, Any]) -> None:
    images = {}
    for name, service in compose["services"].items():
        context = (DEPLOY / service["build"]["context"]).resolve()
        assert (context / service["build"]["dockerfile"]).is_file(), name
        images[name] = service["image"]
    assert images == {"ckptd": f"ckptd:{VERSION}", "trainer": TRAINER_IMAGE}


def test_compose_shares_shm_socket_and_uid(compose: dict[str, Any]) -> None:
    daemon, trainer = compose["services"]["ckptd"], compose["services"]["trainer"]
    assert daemon["ipc"] == "shareable"
    assert trainer["ipc"] == "service:ckptd"
    assert daemon["hostname"] == trainer["hostname"]  # the client compares hostnames
    assert daemon["user"] == trainer["user"] == f"{UID}:{UID}"
    env = {k: str(v) for k, v in daemon["environment"].items()}
    assert set(env) <= KNOWN_ENV
    socket_dir = str(PurePosixPath(env["CKPTD_LISTEN"].removeprefix("unix://")).parent)
    mounts = {v.split(":")[1]: v.split(":")[0] for v in daemon["volumes"]}
    trainer_mounts = {v.split(":")[1]: v.split(":")[0] for v in trainer["volumes"]}
    assert mounts[socket_dir] == trainer_mounts[socket_dir]
    assert mounts[env["CKPTD_STORAGE"]] in compose["volumes"]
    assert arg_after(trainer["command"], "--target") == env["CKPTD_LISTEN"]
    assert trainer["depends_on"]["ckptd"]["condition"] == "service_healthy"
    assert HEALTHCHECK_MODULE in daemon["healthcheck"]["test"]
    assert duration_s(daemon["stop_grace_period"]) > drain_timeout_s(env)


def arg_after(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def duration_s(text: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", text)
    assert match, text
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


# Kubernetes ------------------------------------------------------------------------------


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in k8s_docs():
        if doc["kind"] in ("Job", "Deployment", "DaemonSet", "StatefulSet"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]["spec"]
        elif doc["kind"] == "Pod":
            yield f"Pod/{doc['metadata']['name']}", doc["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def container_env(container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            assert source["configMapRef"]["name"] == "ckptd-config"
            env.update(config_map_env())
    env.update({item["name"]: item["value"] for item in container.get("env", [])
                if "value" in item})
    return env


def secret_env(container: dict[str, Any]) -> dict[str, str]:
    """Variables taken from a Secret: name → the Secret's name."""
    return {item["name"]: item["valueFrom"]["secretKeyRef"]["name"]
            for item in container.get("env", []) if "secretKeyRef" in item.get("valueFrom", {})}


def mount_volume(spec: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    (name,) = [m["name"] for m in container["volumeMounts"] if m["mountPath"] == path]
    (volume,) = [v for v in spec["volumes"] if v["name"] == name]
    return volume


def test_every_k8s_doc_is_named_and_typed() -> None:
    docs = k8s_docs()
    assert {d["kind"] for d in docs} >= {"ConfigMap", "Job", "DaemonSet", "Service"}
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])


def test_config_map_holds_only_daemon_settings() -> None:
    env = config_map_env()
    assert set(env) <= KNOWN_ENV
    config = DaemonConfig.from_settings(
        {key.removeprefix("CKPTD_").lower(): value for key, value in env.items()}
        | {"storage": "/unused"}
    )
    assert config.metrics_address is not None


def test_pods_are_consistent() -> None:
    specs = dict(pod_specs())
    assert len(specs) >= 3
    for where, spec in specs.items():
        assert spec["securityContext"]["runAsUser"] == UID, where
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        volumes = {v["name"] for v in spec["volumes"]}
        for container in containers(spec):
            assert container["image"] in DAEMON_IMAGES | {TRAINER_IMAGE}, where
            assert {m["name"] for m in container["volumeMounts"]} <= volumes, where
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
        # Shared memory works only between a trainer and a daemon on one unix socket, as
        # one uid: a pod with both shares one memory-backed /dev/shm; no pod mounts the
        # node's (a TCP peer's segments are refused, and the node's /dev/shm is everyone's).
        assert all("hostPath" not in v or v["hostPath"]["path"] != "/dev/shm"
                   for v in spec["volumes"]), f"{where}: mounts the node's /dev/shm"
        if len(containers(spec)) > 1:
            shm = {mount_volume(spec, c, "/dev/shm")["name"] for c in containers(spec)}
            assert len(shm) == 1, f"{where}: containers must share one /dev/shm volume"
            volume = mount_volume(spec, containers(spec)[0], "/dev/shm")
            assert volume["emptyDir"]["medium"] == "Memory", where


def daemon_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for where, spec in pod_specs():
        for container in containers(spec):
            if container["image"] in DAEMON_IMAGES:
                yield where, spec, container


def test_daemon_containers_run_the_entrypoint_with_known_settings() -> None:
    found = list(daemon_containers())
    assert {where.split("/")[0] for where, _, _ in found} == {"Job", "DaemonSet"}
    for where, spec, container in found:
        assert container.get("command", ["ckptd", "serve"])[:2] == ["ckptd", "serve"], where
        env = container_env(container)
        assert {k for k in env if k.startswith("CKPTD_")} <= KNOWN_ENV, where
        s3_image = container["image"].endswith("-s3")
        assert env["CKPTD_STORAGE"].startswith("s3://") == s3_image, where
        assert spec["terminationGracePeriodSeconds"] > drain_timeout_s(env), where
        ports = {p["containerPort"] for p in container["ports"]}
        assert int(env["CKPTD_METRICS_LISTEN"].rsplit(":", 1)[1]) in ports, where
        if not s3_image:
            assert mount_volume(spec, container, env["CKPTD_STORAGE"]), where


def test_daemon_probes_reach_the_listen_address() -> None:
    for where, _, container in daemon_containers():
        listen = container_env(container)["CKPTD_LISTEN"]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[kind]
            if listen.startswith("unix:"):  # kubelet's grpc probe cannot dial a socket
                command = probe["exec"]["command"]
                assert command[:3] == ["python", "-m", HEALTHCHECK_MODULE], (where, kind)
                assert probe["timeoutSeconds"] > float(arg_after(command, "--timeout-s"))
            else:
                assert probe["grpc"]["port"] == int(listen.rsplit(":", 1)[1]), (where, kind)


def test_network_daemons_authenticate_with_files_from_a_secret() -> None:
    for where, spec, container in daemon_containers():
        env = container_env(container)
        assert "CKPTD_INSECURE" not in env, where
        listen = env["CKPTD_LISTEN"]
        if listen.startswith("unix:"):
            continue  # the socket is 0600: its peers are the daemon's own uid
        config = DaemonConfig.from_env(env)  # would refuse 0.0.0.0 without authentication
        assert config.auth_tokens or config.tls_client_ca, where
        for path in filter(None, (config.auth_tokens, config.auth_policy, config.tls_cert)):
            volume = mount_volume(spec, container, str(PurePosixPath(path).parent))
            assert "secret" in volume, (where, path)


def test_node_daemon_trainer_takes_its_token_from_a_secret() -> None:
    (spec,) = [s for where, s in pod_specs() if where == "Job/train-on-node-daemon"]
    (trainer,) = spec["containers"]
    assert secret_env(trainer) == {"CKPTD_TOKEN": "ckptd-token-train-on-node-daemon"}


def test_sidecar_trainer_dials_the_daemon_socket_it_mounts() -> None:
    (spec,) = [s for where, s in pod_specs() if where == "Job/train-demo"]
    (daemon,) = spec["initContainers"]
    assert daemon["restartPolicy"] == "Always"  # a native sidecar
    (trainer,) = spec["containers"]
    listen = container_env(daemon)["CKPTD_LISTEN"]
    assert arg_after(trainer["args"], "--target") == listen
    socket_dir = str(PurePosixPath(listen.removeprefix("unix://")).parent)
    assert mount_volume(spec, daemon, socket_dir) == mount_volume(spec, trainer, socket_dir)


def test_daemonset_service_and_trainer_agree() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in k8s_docs()}
    daemonset, service = docs[("DaemonSet", "ckptd")], docs[("Service", "ckptd")]
    template = daemonset["spec"]["template"]
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert service["spec"]["internalTrafficPolicy"] == "Local"
    (container,) = template["spec"]["containers"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    for port in service["spec"]["ports"]:
        assert port_names[port["targetPort"]] == port["port"]
    trainer_spec = docs[("Job", "train-on-node-daemon")]["spec"]["template"]
    assert arg_after(trainer_spec["spec"]["containers"][0]["args"], "--target") == (
        f"ckptd:{port_names['grpc']}"
    )
    policy = docs[("NetworkPolicy", "ckptd")]["spec"]
    client_labels = policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert client_labels.items() <= trainer_spec["metadata"]["labels"].items()


def test_daemonset_shares_one_object_store_with_valid_lease_settings() -> None:
    # One daemon per node on one S3 prefix: leases and the catalog's staleness bound are set
    # explicitly, and the daemon's own config accepts them (renewals at most a third of
    # the lease, so two may fail before a lease lapses).
    (daemonset,) = [d for d in k8s_docs() if d["kind"] == "DaemonSet"]
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    env = container_env(container)
    assert env["CKPTD_STORAGE"].startswith("s3://")
    settings = {key.removeprefix("CKPTD_").lower(): value for key, value in env.items()
                if key.startswith("CKPTD_")}
    config = DaemonConfig.from_settings(settings)
    assert {"lease_ttl_s", "lease_renew_interval_s", "catalog_refresh_s"} <= set(settings)
    assert config.engine.lease_renew_interval_s * 3 <= config.engine.lease_ttl_s


# systemd ---------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "ckptd.service"


@pytest.fixture(scope="module")
def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def unit_environment() -> dict[str, str]:
    """Every ``Environment=`` line (configparser keeps only the last of repeated keys)."""
    lines = re.findall(r"^Environment=(\S+?)=(\S+)$", UNIT.read_text(), re.M)
    return dict(lines)


def test_systemd_unit_runs_the_installed_daemon(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    assert unit["Unit"]["Description"]
    assert service["ExecStart"] == "/opt/ckptd/bin/ckptd serve"
    assert service["User"] == "ckptd"
    assert service["KillSignal"] == "SIGTERM"
    assert service["Restart"] == "on-failure"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    env = unit_environment()
    assert set(env) <= KNOWN_ENV
    assert env["CKPTD_STORAGE"] == f"/var/lib/{service['StateDirectory']}"
    assert env["CKPTD_LISTEN"].startswith(f"unix:///run/{service['RuntimeDirectory']}/")
    assert float(service["TimeoutStopSec"]) > drain_timeout_s(env)
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "PrivateTmp": "yes", "ProtectHome": "yes"}.items():
        assert service[key] == value, key
    assert "ProcSubset" not in service  # the daemon reads /proc/sys/kernel/random/boot_id


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd's own parser: catches misspelt directives and bad values."""
    copy = tmp_path / "ckptd.service"  # ExecStart must exist for verify; keep the rest
    copy.write_text(re.sub(r"^ExecStart=.*$", "ExecStart=/bin/true", UNIT.read_text(), flags=re.M))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "Unknown" not in result.stderr, result.stderr

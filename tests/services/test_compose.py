"""Static checks of the compose files and Dockerfiles (the containers themselves: tests/containers): they
parse, every build context, Dockerfile, copied path and command exists, ports and variables agree between
services, every install is pinned, and the files stay within what Compose 1.29 accepts."""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
GPU = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())
SERVICES = COMPOSE["services"]
BUILT = {name: svc for name, svc in SERVICES.items() if "build" in svc}


def dockerfile(name: str) -> tuple[Path, str]:
    """The Dockerfile compose builds `name` from; ``inference-torch``: docker-compose.gpu.yml's inference."""
    build = GPU["services"]["inference"]["build"] if name == "inference-torch" else BUILT[name]["build"]
    path = REPO / build["context"] / build["dockerfile"]
    return path, path.read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    kept = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    joined = re.sub(r"\\\n", " ", kept)
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in joined.splitlines()
        if line.strip()
    ]


def exec_form(args: str) -> list[str]:
    return yaml.safe_load(args) if args.strip().startswith("[") else shlex.split(args)


def env_vars_read_by_the_code() -> set[str]:
    """XRAYFM_* names the services' code reads (the settings classes' variables, and names written out in
    the code), and those the images' entrypoint and checks read."""
    from pydantic_settings import BaseSettings

    from xrayfm_stack import settings

    names = {
        name
        for cls in vars(settings).values()
        if isinstance(cls, type) and issubclass(cls, BaseSettings)
        for field in cls.model_fields.values()
        for name in getattr(field.validation_alias, "choices", [field.validation_alias])  # AliasChoices
        if isinstance(name, str)
    }
    for path in [*REPO.glob("services/*/xrayfm_*/**/*.py"), *REPO.glob("services/base/*")]:
        names |= set(re.findall(r"[\"{](XRAYFM_[A-Z_]+)[\"}:]", path.read_text()))
    return names


def test_compose_files_parse_and_build_the_services():
    assert set(BUILT) == {"gateway", "inference", "training", "frontend", "orthanc", "router"}
    assert {"redis", "redis-training", "redis-secret", "prometheus"} <= set(SERVICES)
    assert set(GPU["services"]) <= set(SERVICES)


def test_compose_files_stay_within_what_compose_1_29_accepts():
    """No top-level `name:` (1.29 refuses it): the project name comes from the committed .env."""
    for data in (COMPOSE, GPU):
        assert set(data) <= {"services", "networks", "volumes", "x-queue-env", "x-redis"}, set(data)
    env = dict(
        line.split("=", 1)
        for line in (REPO / ".env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert env["COMPOSE_PROJECT_NAME"] == "xrayfm"
    # Closed by default, and no secret committed.
    assert env["XRAYFM_BIND"] == "127.0.0.1" and env["XRAYFM_REDIS_PASSWORD"] == ""


def base_stage_args(text: str) -> list[str]:
    return [args for kind, args in instructions(text) if kind == "ARG" and args.startswith("BASE_IMAGE")]


@pytest.mark.parametrize("name", ["gateway", "inference", "inference-torch", "training", "frontend"])
def test_dockerfiles_are_multi_stage_non_root_with_healthchecks(name):
    path, text = dockerfile(name)
    context = (
        REPO
        / (GPU["services"]["inference"] if name == "inference-torch" else BUILT[name])["build"]["context"]
    )
    assert context.is_dir() and path.is_file()
    steps = instructions(text)
    kinds = [kind for kind, _ in steps]
    assert base_stage_args(text) == ["BASE_IMAGE=python:3.11-slim"] and kinds[0] == "ARG"
    assert kinds.count("FROM") >= 2  # multi-stage: what builds the venv stays out of the image
    final = [args for kind, args in steps if kind == "FROM"][-1]
    assert final == ("${BASE_IMAGE}" if name in ("gateway", "frontend", "inference") else "worker-deps"), (
        final
    )
    users = [args for kind, args in steps if kind == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert "HEALTHCHECK" in kinds and "CMD" in kinds
    assert exec_form([args for kind, args in steps if kind == "ENTRYPOINT"][-1]) == ["xrayfm-entrypoint"]
    allowed = [
        line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines() if line[:1] == "!"
    ]
    for kind, args in steps:
        if kind == "COPY" and not args.startswith("--from="):
            for source in exec_form(args)[:-1]:
                assert (context / source).exists(), f"{path}: COPY {source}"
                src = source.rstrip("/")
                assert any(src.startswith(a) or a.startswith(src + "/") for a in allowed), (
                    f"ignored: {source}"
                )
    # BuildKit reads the Dockerfile's own ignore file, the legacy builder (Compose 1.29) the root's.
    ignore = path.with_name(path.name + ".dockerignore")
    assert ignore.read_text() == (REPO / ".dockerignore").read_text()


def pip_installs(text: str) -> list[str]:
    return [
        part.strip()
        for kind, args in instructions(text)
        if kind == "RUN"
        for part in args.split("&&")
        if re.search(r"\bpip (install|wheel)\b", part)
    ]


@pytest.mark.parametrize(
    "path", [*sorted(REPO.glob("services/*/Dockerfile")), *sorted(REPO.glob("deploy/base/*.Dockerfile"))]
)
def test_every_install_is_pinned_by_the_constraints(path):
    """No unpinned `pip install`: third-party packages come at the versions of requirements/constraints.txt
    (or, for the torch base, the wheelhouse's pins of them); local packages go in with --no-deps."""
    for command in pip_installs(path.read_text()):
        pinned = "-c requirements/constraints.txt" in command or "-c /wheels/constraints.txt" in command
        assert pinned or "--no-deps" in command, f"{path.relative_to(REPO)}: {command}"


def test_the_constraints_are_the_versions_the_tests_run_with():
    """requirements/constraints.txt pins what this environment has installed (make install uses it)."""
    pins = {}
    for line in (REPO / "requirements/constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    different = {}
    for name, version in pins.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if installed != version:
            different[name] = (version, installed)
    assert not different, f"constraints vs installed: {different} (make constraints rewrites the file)"
    makefile = (REPO / "Makefile").read_text()
    assert "CONSTRAINTS := requirements/constraints.txt" in makefile
    # Every install takes the hashed lock of those versions (tests/test_lock.py), or resolves nothing.
    installs = re.findall(r"^\t\$\(PIP\) install .*$", makefile, flags=re.M)
    assert installs and all("-r $(LOCK)" in line or "--no-deps" in line for line in installs), installs


def test_every_requirement_of_every_image_is_pinned():
    """A requirement the constraints do not name would install at any version (the images also check
    what they installed: deploy/pyproject_deps.py --check-pinned)."""
    pinned = {
        re.sub(r"[-_.]+", "-", line.split("==")[0]).lower()
        for line in (REPO / "requirements/constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    images = [
        ["shared", "services/common", "services/gateway"],
        ["shared[render]", "services/common", "services/frontend"],
        ["shared[torch]", "services/common", "services/inference", "services/training"],
    ]
    for projects in images:
        names = {re.sub(r"[-_.]+", "-", name) for name in dependencies_of(*projects)}
        assert names <= pinned, f"{projects}: not in requirements/constraints.txt: {sorted(names - pinned)}"


def dependencies_of(*projects: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, str(REPO / "deploy/pyproject_deps.py"), *projects],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [re.split(r"[<>=\[ ;]", line, maxsplit=1)[0].lower() for line in out.splitlines() if line.strip()]


def test_gateway_frontend_and_cpu_inference_images_install_no_torch_and_the_torch_workers_share_layers():
    torch_stack = {"torch", "torchvision", "timm", "peft", "triton"}
    for name, projects in [
        ("gateway", ["shared", "services/common", "services/gateway"]),
        ("frontend", ["'shared[render]'", "services/common", "services/frontend"]),
        ("inference", ["'shared[serve]'", "services/common", "services/inference"]),
    ]:
        _, text = dockerfile(name)
        assert "deploy/pyproject_deps.py " + " ".join(projects) in text
        assert not torch_stack & set(dependencies_of(*(p.strip("'") for p in projects))), name
        installs = [args for kind, args in instructions(text) if kind == "RUN" and "install" in args]
        assert not any(re.search(r"install[^&;]*torch", args.lower()) for args in installs), name
    stages = []
    for name in ("inference-torch", "training"):
        _, text = dockerfile(name)
        stage = re.search(
            r"^FROM \$\{TORCH_BASE_IMAGE\} AS worker-deps\n.*?(?=^FROM )", text, flags=re.S | re.M
        )
        assert stage, name
        stages.append(stage[0])
    assert stages[0] == stages[1]  # built one after the other, the second build reuses the first's layers
    assert {"torch", "timm", "peft"} <= set(dependencies_of("shared[torch]", "services/common"))
    base = (REPO / "services/base/Dockerfile").read_text()
    assert base_stage_args(base) == ["BASE_IMAGE=python:3.11-slim"]
    assert "--no-index" in base and "torch torchvision" in base  # from the wheelhouse, nothing downloaded


@pytest.mark.parametrize("name", ["gateway", "inference", "frontend"])
def test_commands_point_at_code_that_exists(name):
    _, text = dockerfile(name)
    steps = instructions(text)
    cmd = exec_form([args for kind, args in steps if kind == "CMD"][-1])
    health = [args for kind, args in steps if kind == "HEALTHCHECK"][-1]
    if name == "gateway":  # python -m xrayfm_gateway.serve: a module with a main() that serves the app
        assert cmd[:2] == ["python", "-m"]
        serve = (REPO / "services/gateway" / (cmd[2].replace(".", "/") + ".py")).read_text()
        assert "def main(" in serve and '"xrayfm_gateway.app:create_app"' in serve
        assert "def create_app(" in (REPO / "services/gateway/xrayfm_gateway/app.py").read_text()
    elif name == "inference":
        assert cmd[:2] == ["celery", "-A"] and "--pool=threads" in cmd
        assert (REPO / "services/inference" / (cmd[2].replace(".", "/") + ".py")).is_file()
        assert (REPO / "services/inference/xrayfm_inference/healthcheck.py").is_file()
        assert "xrayfm_inference.healthcheck" in health
    else:
        assert cmd[:2] == ["streamlit", "run"] and (REPO / cmd[2]).is_file()


def _container_port(mapping: str) -> int:
    return int(str(mapping).rsplit(":", 1)[1])


@pytest.mark.parametrize(("name", "port"), [("gateway", 8000), ("frontend", 8501)])
def test_published_ports_match_expose_cmd_and_healthcheck(name, port):
    assert [_container_port(p) for p in SERVICES[name]["ports"]] == [port]
    assert all(str(p).startswith("${XRAYFM_BIND:-127.0.0.1}:") for p in SERVICES[name]["ports"])  # closed
    _, text = dockerfile(name)
    steps = instructions(text)
    assert f"{port}" in [args.strip() for kind, args in steps if kind == "EXPOSE"]
    cmd = " ".join(exec_form([args for kind, args in steps if kind == "CMD"][-1]))
    assert re.search(rf"--(server\.)?port[ =]{port}\b", cmd)
    assert f"127.0.0.1:{port}" in [args for kind, args in steps if kind == "HEALTHCHECK"][-1]


def test_redis_is_internal_only_and_urls_agree():
    assert COMPOSE["networks"]["backend"].get("internal") is True
    for name in ("redis", "redis-training"):
        assert "ports" not in SERVICES[name]
        assert all(net in ("backend",) for net in SERVICES[name]["networks"])
    queue_keys = ("XRAYFM_REDIS_URL", "XRAYFM_QUEUE", "XRAYFM_RESULT_EXPIRES", "XRAYFM_TASK_TIME_LIMIT",
                  "XRAYFM_VISIBILITY_TIMEOUT")  # fmt: skip
    gateway, worker = SERVICES["gateway"]["environment"], SERVICES["inference"]["environment"]
    for key in queue_keys:
        assert gateway[key] == worker[key], key
    assert re.fullmatch(r"redis://redis:6379/\d+", gateway["XRAYFM_REDIS_URL"])
    assert int(worker["XRAYFM_VISIBILITY_TIMEOUT"]) > float(worker["XRAYFM_TASK_TIME_LIMIT"])
    frontend_url = SERVICES["frontend"]["environment"]["XRAYFM_GATEWAY_URL"]
    assert frontend_url == f"http://gateway:{_container_port(SERVICES['gateway']['ports'][0])}"
    assert set(SERVICES["frontend"]["networks"]) & set(SERVICES["gateway"]["networks"])
    training = SERVICES["training"]["environment"]
    assert (
        gateway["XRAYFM_TRAINING_REDIS_URL"]
        == training["XRAYFM_TRAINING_REDIS_URL"]
        == "redis://redis-training:6379/0"
    )
    assert gateway["XRAYFM_TRAINING_QUEUE"] == training["XRAYFM_TRAINING_QUEUE"]


def test_redis_requires_a_password_and_only_the_training_redis_keeps_data():
    """Both Redis servers read the redis.conf (requirepass) the init step writes; the services get the
    password through the entrypoint (XRAYFM_REDIS_PASSWORD_FILE); inference Redis writes nothing to disk,
    the training one an append-only file (fsync every second) on a named volume."""
    init = SERVICES["redis-secret"]
    script = init["command"][0]
    assert "requirepass" in script and "/dev/urandom" in script and "XRAYFM_REDIS_PASSWORD" in script
    assert init["restart"] == "no" and init["network_mode"] == "none"
    for name in ("redis", "redis-training"):
        svc = SERVICES[name]
        assert svc["command"][:2] == ["redis-server", "/run/xrayfm/redis.conf"]
        assert svc["depends_on"]["redis-secret"] == {"condition": "service_completed_successfully"}
        assert mounts(svc)["/run/xrayfm"] == ("redis-secret", "ro")
        assert "redis-password" in " ".join(svc["healthcheck"]["test"])
    inference_redis, training_redis = SERVICES["redis"]["command"], SERVICES["redis-training"]["command"]
    assert inference_redis[inference_redis.index("--appendonly") + 1] == "no"
    assert inference_redis[inference_redis.index("--save") + 1] == "" and "volumes" not in COMPOSE["volumes"]
    assert training_redis[training_redis.index("--appendonly") + 1] == "yes"
    assert training_redis[training_redis.index("--appendfsync") + 1] == "everysec"
    assert mounts(SERVICES["redis-training"])["/data"] == ("redis-training", "rw")
    for name in ("gateway", "inference", "training"):
        svc = SERVICES[name]
        assert mounts(svc)["/run/xrayfm"] == ("redis-secret", "ro")
        assert svc["environment"]["XRAYFM_REDIS_PASSWORD_FILE"] == "/run/xrayfm/redis-password"


def test_every_variable_set_is_one_the_code_reads():
    known = env_vars_read_by_the_code() | {"XRAYFM_REDIS_PASSWORD"}  # read by the redis-secret init step
    for name, svc in SERVICES.items():
        for key in svc.get("environment", {}) or {}:
            if key.startswith("XRAYFM_"):
                assert key in known, f"{name}: {key} is not read anywhere"
    for key in GPU["services"]["inference"]["environment"]:
        assert key in known


def mounts(service: dict) -> dict[str, tuple[str, str]]:
    """Container path -> (source, mode) of a service's short-syntax volumes (sources may hold ${VAR:-x})."""
    found = {}
    for entry in service.get("volumes", []):
        match = re.fullmatch(r"(?P<source>.+?):(?P<target>/[^:]*)(?::(?P<mode>ro|rw))?", entry)
        assert match, f"unparsed volume {entry!r}"
        found[match["target"]] = (match["source"], match["mode"] or "rw")
    return found


def test_workers_scale_and_share_the_volumes():
    worker = SERVICES["inference"]
    assert "ports" not in worker and "container_name" not in worker  # `--scale inference=N` works
    store = worker["environment"]["XRAYFM_MODEL_STORE"]
    assert mounts(worker)[store] == ("model-store", "ro")
    assert mounts(SERVICES["training"])[SERVICES["training"]["environment"]["XRAYFM_MODEL_STORE"]] == (
        "model-store",
        "rw",
    )
    named = [source for svc in SERVICES.values() for source, _ in mounts(svc).values() if "/" not in source]
    assert set(named) <= set(COMPOSE["volumes"])


def test_datasets_are_a_read_only_host_folder_at_the_path_the_readme_uses():
    source = "${XRAYFM_DATA_DIR:-./data}"
    for name in ("training", "inference"):
        assert mounts(SERVICES[name])["/data"] == (source, "ro"), name
    guide = (REPO / "docs/training-stack.md").read_text()
    assert "XRAYFM_DATA_DIR" in guide
    roots = re.findall(r'"(?:root|foundation)": "(/[^"]+)"', guide)
    assert roots and all(root.startswith("/data/") for root in roots), roots
    for folder in re.findall(r'"(?:cache|val_cache)": "(/[^"]+)"', guide):
        assert folder.startswith(SERVICES["training"]["environment"]["XRAYFM_TRAINING_RUNS"] + "/"), folder


def test_training_worker_has_shared_memory_for_dataloader_workers_and_takes_the_bootstrap_switch():
    training = SERVICES["training"]
    size = re.fullmatch(r"(\d+)([kmg])b?", str(training.get("shm_size", "")).lower())
    assert size and int(size[1]) * {"k": 2**10, "m": 2**20, "g": 2**30}[size[2]] >= 2**30
    assert training["environment"]["XRAYFM_BOOTSTRAP"] == "${XRAYFM_BOOTSTRAP:-shipped}"


def test_every_variable_the_docs_name_is_read_by_the_code_or_compose():
    compose = set(re.findall(r"\$\{(XRAYFM_[A-Z_]+)", (REPO / "docker-compose.yml").read_text()))
    tests = set(re.findall(r"\"(XRAYFM_[A-Z_]+)\"", (REPO / "tests/helpers.py").read_text()))  # real data
    tests |= set(
        re.findall(r"\"(XRAYFM_[A-Z_]+)\"", (REPO / "tests/containers/test_compose_stack.py").read_text())
    )
    scripts = {
        name
        for path in REPO.glob("deploy/*.sh")
        for name in re.findall(r"XRAYFM_[A-Z_]*[A-Z]", path.read_text())
    }
    known = env_vars_read_by_the_code() | compose | tests | scripts
    for doc in ("README.md", "services/README.md", "docs/training-stack.md", "docs/ops.md"):
        named = set(re.findall(r"XRAYFM_[A-Z_]*[A-Z]", (REPO / doc).read_text()))
        assert not named - known, f"{doc} names variables nothing reads: {sorted(named - known)}"


def test_prometheus_profile_scrapes_the_right_ports():
    prom = SERVICES["prometheus"]
    assert prom["profiles"] == ["monitoring"]
    source = prom["volumes"][0].split(":")[0]
    config = yaml.safe_load((REPO / source).read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    gateway_target = jobs["xrayfm-gateway"]["static_configs"][0]["targets"][0]
    assert gateway_target == f"gateway:{_container_port(SERVICES['gateway']['ports'][0])}"
    sd = jobs["xrayfm-inference"]["dns_sd_configs"][0]
    assert sd["names"] == ["inference"]
    assert sd["port"] == int(SERVICES["inference"]["environment"]["XRAYFM_WORKER_METRICS_PORT"])
    assert set(prom["networks"]) >= {"backend"}  # the workers are on the internal network only
    assert prom["ports"][0].startswith("${XRAYFM_BIND:-127.0.0.1}:")


@pytest.mark.parametrize("name", ["inference", "training"])
def test_gpu_file_gives_each_worker_one_gpu(name):
    devices = GPU["services"][name]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert devices[0]["count"] == 1  # a training job runs on one device; several GPUs: torchrun (README)
    if name == "inference":
        assert GPU["services"][name]["environment"]["XRAYFM_DEVICE"] == "cuda"


def default_of(value: str) -> str:
    """The default of a ``${VAR:-default}`` value (or the value itself)."""
    match = re.fullmatch(r"\$\{\w+:-(.+)\}", str(value))
    return match[1] if match else str(value)


def test_every_long_running_service_has_a_memory_limit_and_the_gateway_fits_in_its_own():
    """The gateway's memory is bounded by construction: the upload buffer, its decoder processes (each
    capped at XRAYFM_DECODE_MEMORY_MB of address space) and the process itself (~120 MB measured,
    docs/reliability.md; 300 MB allowed here). Its compose limit must hold all of them."""
    from xrayfm_stack.settings import GatewaySettings

    for name, svc in SERVICES.items():
        if svc.get("restart") == "unless-stopped" or "profiles" in svc:
            assert "mem_limit" in svc, f"{name} has no mem_limit"
    gateway = SERVICES["gateway"]
    limit = default_of(gateway["mem_limit"])
    limit_mb = int(limit[:-1]) * {"g": 1024, "m": 1}[limit[-1]]
    decoders = int(default_of(gateway["environment"]["XRAYFM_DECODE_CONCURRENCY"]))
    defaults = GatewaySettings()
    bound_mb = defaults.upload_buffer_bytes / 2**20 + decoders * defaults.decode_memory_mb + 300
    assert bound_mb <= limit_mb, (bound_mb, limit_mb)

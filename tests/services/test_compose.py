"""Static checks of the compose files and Dockerfiles (Docker cannot run here): they parse, every build
context, Dockerfile, copied path and command exists, and ports and variables agree between services."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
GPU = yaml.safe_load((REPO / "docker-compose.gpu.yml").read_text())
SERVICES = COMPOSE["services"]
BUILT = {name: svc for name, svc in SERVICES.items() if "build" in svc}


def dockerfile(name: str) -> tuple[Path, str]:
    build = BUILT[name]["build"]
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
    names = set()
    for path in REPO.glob("services/*/xrayfm_*/**/*.py"):
        names |= set(re.findall(r"\"(XRAYFM_[A-Z_]+)\"", path.read_text()))
    return names


def test_compose_files_parse_and_build_the_four_services():
    assert set(BUILT) == {"gateway", "inference", "training", "frontend"}
    assert {"redis", "prometheus"} <= set(SERVICES)
    assert set(GPU["services"]) <= set(SERVICES)


@pytest.mark.parametrize("name", ["gateway", "inference", "frontend"])
def test_dockerfiles_exist_are_small_non_root_with_healthchecks(name):
    path, text = dockerfile(name)
    assert (REPO / BUILT[name]["build"]["context"]).is_dir() and path.is_file()
    steps = instructions(text)
    kinds = [kind for kind, _ in steps]
    assert kinds[0] == "FROM" and "slim" in steps[0][1]
    users = [args for kind, args in steps if kind == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert "HEALTHCHECK" in kinds and "CMD" in kinds
    for kind, args in steps:
        if kind == "COPY":
            for source in exec_form(args)[:-1]:
                assert (REPO / BUILT[name]["build"]["context"] / source).exists(), f"{path}: COPY {source}"
    ignore = path.with_name(path.name + ".dockerignore")
    assert ignore.is_file() and "!services/" in ignore.read_text() and "!shared/src/" in ignore.read_text()


@pytest.mark.parametrize("name", ["gateway", "inference", "frontend"])
def test_commands_point_at_code_that_exists(name):
    _, text = dockerfile(name)
    steps = instructions(text)
    cmd = exec_form([args for kind, args in steps if kind == "CMD"][-1])
    health = [args for kind, args in steps if kind == "HEALTHCHECK"][-1]
    if name == "gateway":
        module, attr = cmd[1].split(":")
        assert cmd[0] == "uvicorn" and "--factory" in cmd
        assert f"def {attr}(" in (REPO / "services/gateway" / (module.replace(".", "/") + ".py")).read_text()
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
    _, text = dockerfile(name)
    steps = instructions(text)
    assert f"{port}" in [args.strip() for kind, args in steps if kind == "EXPOSE"]
    cmd = " ".join(exec_form([args for kind, args in steps if kind == "CMD"][-1]))
    assert re.search(rf"--(server\.)?port[ =]{port}\b", cmd)
    assert f"127.0.0.1:{port}" in [args for kind, args in steps if kind == "HEALTHCHECK"][-1]


def test_redis_is_internal_only_and_urls_agree():
    assert "ports" not in SERVICES["redis"]
    assert COMPOSE["networks"]["backend"].get("internal") is True
    assert all(net in ("backend",) for net in SERVICES["redis"]["networks"])
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


def test_every_variable_set_is_one_the_code_reads():
    known = env_vars_read_by_the_code()
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


def _section(text: str, heading: str) -> str:
    """The text under a Markdown heading, up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    start = text.index(heading + "\n")
    following = re.search(rf"^#{{1,{len(level)}}} ", text[start + len(heading) :], flags=re.M)
    return text[start : start + len(heading) + (following.start() if following else len(text))]


def test_datasets_are_a_read_only_host_folder_at_the_path_the_readme_uses():
    source = "${XRAYFM_DATA_DIR:-./data}"
    for name in ("training", "inference"):
        assert mounts(SERVICES[name])["/data"] == (source, "ro"), name
    guide = _section((REPO / "README.md").read_text(), "## Training through the stack")
    assert "XRAYFM_DATA_DIR" in guide
    roots = re.findall(r'"(?:root|foundation)": "(/[^"]+)"', guide)
    assert roots and all(root.startswith("/data/") for root in roots), roots
    for folder in re.findall(r'"(?:cache|val_cache)": "(/[^"]+)"', guide):
        assert folder.startswith(SERVICES["training"]["environment"]["XRAYFM_TRAINING_RUNS"] + "/"), folder


def test_training_worker_has_shared_memory_for_dataloader_workers_and_takes_the_bootstrap_switch():
    training = SERVICES["training"]
    size = re.fullmatch(r"(\d+)([kmg])b?", str(training.get("shm_size", "")).lower())
    assert size and int(size[1]) * {"k": 2**10, "m": 2**20, "g": 2**30}[size[2]] >= 2**30
    assert training["environment"]["XRAYFM_BOOTSTRAP"] == "${XRAYFM_BOOTSTRAP:-demo}"


def test_every_variable_the_docs_name_is_read_by_the_code_or_compose():
    compose = set(re.findall(r"\$\{(XRAYFM_[A-Z_]+)", (REPO / "docker-compose.yml").read_text()))
    tests = set(re.findall(r"\"(XRAYFM_[A-Z_]+)\"", (REPO / "tests/conftest.py").read_text()))  # real data
    known = env_vars_read_by_the_code() | compose | tests
    for doc in ("README.md", "services/README.md"):
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


@pytest.mark.parametrize("name", ["inference", "training"])
def test_gpu_file_gives_each_worker_one_gpu(name):
    devices = GPU["services"][name]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1 and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert devices[0]["count"] == 1  # a training job runs on one device; several GPUs: torchrun (README)
    if name == "inference":
        assert GPU["services"][name]["environment"]["XRAYFM_DEVICE"] == "cuda"

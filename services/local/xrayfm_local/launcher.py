"""Run the xrayfm stack as local processes: Redis, inference worker(s), gateway, frontend; and, when Orthanc
is installed, a local PACS (Orthanc) with the router that sends its new studies to the gateway.

    python -m xrayfm_local up      # start what is not running; wait until /ready; print the URLs
    python -m xrayfm_local down    # stop everything started by `up`
    python -m xrayfm_local status

`make up` / `make down` call this. Logs go to runs/stack/logs/, pid files to runs/stack/pids/. What it reads
of the environment it reads through settings objects: the services' own (:mod:`xrayfm_stack.settings`, as
the processes it starts will read them) and :class:`LaunchSettings` for its ports and hosts.
Redis comes from the system: a server already answering on XRAYFM_REDIS_URL is used as is; otherwise
`redis-server` is started (install it with `apt-get install redis-server`, `brew install redis`, or run
`docker run -p 6379:6379 redis:7`). The same `Stack` class starts the stacks of the integration tests
and the benchmark (each on its own ports, Redis and queue). It runs from a checkout of the repository
(the services installed in editable mode, as `make install` does); no image installs it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from pydantic import Field

from xrayfm.errors import XrayfmError
from xrayfm_stack.settings import (
    BOOTSTRAP_MODES,
    GatewaySettings,
    InferenceSettings,
    RouterSettings,
    StackSettings,
)
from xrayfm_stack.store import SERVING_FILE

REPO = Path(__file__).resolve().parents[3]  # services/local/xrayfm_local/launcher.py -> the repository
VENV_BIN = Path(sys.executable).parent
PYTHONPATH = os.pathsep.join(
    str(REPO / p)
    for p in (
        "shared/src",
        "services/common",
        "services/inference",
        "services/training",
        "services/gateway",
        "services/frontend",
        "services/router",
    )
)
ORTHANC_CONFIG = REPO / "deploy" / "orthanc" / "orthanc.json"  # the compose PACS's, which local ones adapt
ORTHANC_USER = "xrayfm"  # the one user of deploy/orthanc/orthanc.json


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.3) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def redis_answers(url: str) -> bool:
    """True when a Redis server answers PING at `url`."""
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def http_json(url: str, timeout: float = 2.0) -> tuple[int, dict]:
    """GET `url`: (status, JSON body); (0, {}) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}
    except (OSError, ValueError):
        return 0, {}


@dataclass
class Proc:
    """A process started by the stack, with its log file."""

    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Stack:
    """One stack's processes and settings; every process gets `env` (XRAYFM_* variables)."""

    home: Path  # logs/ and pids/ live here
    env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)

    def _start(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> Proc:
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{name}.log"
        env = {**os.environ, **self.env, **(extra_env or {})}
        env["PYTHONPATH"] = PYTHONPATH + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: `down` and tests stop it and its children
            )  # fmt: skip
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        pids = self.home / "pids"
        pids.mkdir(parents=True, exist_ok=True)
        (pids / f"{name}.pid").write_text(str(popen.pid))
        return proc

    def start_redis(self, port: int, data_dir: Path | None = None) -> Proc:
        """A private redis-server on 127.0.0.1:`port`: it writes nothing to disk, or, with `data_dir`, keeps
        an append-only file there (fsync every second) that a restart reads back (the training side's
        job records and queue)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server not found: apt-get install redis-server (or brew install redis)")
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        if data_dir is None:
            argv += ["--appendonly", "no"]
        else:
            Path(data_dir).mkdir(parents=True, exist_ok=True)
            argv += [
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--dir",
                str(Path(data_dir).resolve()),
            ]
        proc = self._start(f"redis-{port}", argv)
        wait_until(lambda: port_open("127.0.0.1", port), 10, f"redis on port {port}", proc)
        return proc

    def start_worker(
        self, name: str = "worker", concurrency: int = 8, extra_env: dict[str, str] | None = None
    ) -> Proc:
        """A Celery inference worker (thread pool: requests wait in threads, the batcher runs the model)."""
        argv = [
            str(VENV_BIN / "celery"), "-A", "xrayfm_inference.worker", "worker", "--pool=threads",
            f"--concurrency={concurrency}", "-n", f"{name}@%h", "--loglevel=INFO", "--without-gossip",
            "--without-mingle",
        ]  # fmt: skip
        return self._start(name, argv, extra_env)

    def start_training_worker(self, name: str = "trainer", extra_env: dict[str, str] | None = None) -> Proc:
        """A Celery training worker: one job at a time (solo pool), on the training queue."""
        queue = {**self.env, **(extra_env or {})}.get("XRAYFM_TRAINING_QUEUE", "xrayfm-training")
        argv = [
            str(VENV_BIN / "celery"), "-A", "xrayfm_training.worker", "worker", "--pool=solo", "-Q", queue,
            "-n", f"{name}@%h", "--loglevel=INFO", "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        return self._start(name, argv, extra_env)

    def start_gateway(
        self,
        port: int,
        host: str = "127.0.0.1",
        name: str = "gateway",
        extra_env: dict[str, str] | None = None,
    ) -> Proc:
        """The FastAPI gateway under uvicorn (``XRAYFM_GATEWAY_WORKERS`` processes, :mod:`xrayfm_gateway.serve`).

        MALLOC_ARENA_MAX=2: decoding large uploads in several threads makes glibc keep one heap per thread;
        two arenas keep the gateway's memory far lower under a mix of real radiographs, at the same
        throughput (docs/reliability.md)."""
        argv = [str(VENV_BIN / "python"), "-m", "xrayfm_gateway.serve", "--host", host, "--port", str(port)]
        proc = self._start(name, argv, {"MALLOC_ARENA_MAX": "2", **(extra_env or {})})
        wait_until(
            lambda: http_json(f"http://127.0.0.1:{port}/health")[0] == 200, 30, "gateway /health", proc
        )
        return proc

    def start_frontend(self, port: int, gateway_url: str, host: str = "127.0.0.1") -> Proc:
        """The Streamlit UI, talking to `gateway_url`."""
        argv = [
            str(VENV_BIN / "streamlit"), "run", str(REPO / "services/frontend/xrayfm_frontend/app.py"),
            "--server.port", str(port), "--server.address", host, "--server.headless", "true",
            "--browser.gatherUsageStats", "false",
        ]  # fmt: skip
        # viewer: no deploy button or developer menu for staff (Streamlit's STREAMLIT_CLIENT_TOOLBAR_MODE)
        env = {"XRAYFM_GATEWAY_URL": gateway_url, "STREAMLIT_CLIENT_TOOLBAR_MODE": "viewer"}
        proc = self._start("frontend", argv, env)
        wait_until(lambda: port_open("127.0.0.1", port), 60, f"frontend on port {port}", proc)
        return proc

    def start_orthanc(
        self, folder: Path, http_port: int, dicom_port: int, password: str, stable_age: int = 10
    ) -> Proc:
        """A local Orthanc PACS (``/usr/sbin/Orthanc``): deploy/orthanc/orthanc.json with its storage in
        `folder`, its ports here, HTTP for this host only; user ``xrayfm`` with `password` (given in the
        environment, never written into the configuration). `stable_age`: seconds without a new instance
        before a study is ``StableStudy`` in the changes feed."""
        binary = orthanc_binary()
        if binary is None:
            raise SystemExit("Orthanc not found: apt-get install orthanc orthanc-dicomweb orthanc-gdcm")
        config = json.loads(ORTHANC_CONFIG.read_text())
        folder.mkdir(parents=True, exist_ok=True)
        storage = str((folder / "db").resolve())
        config.update(
            StorageDirectory=storage, IndexDirectory=storage, HttpPort=http_port, DicomPort=dicom_port,
            RemoteAccessAllowed=False, StableAge=stable_age,
        )  # fmt: skip
        (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
        proc = self._start(
            f"orthanc-{http_port}", [binary, str(folder / "orthanc.json")], {"ORTHANC_PASSWORD": password}
        )
        url = f"http://127.0.0.1:{http_port}"
        wait_until(lambda: orthanc_answers(url, password), 30, f"Orthanc on port {http_port}", proc)
        return proc

    def start_router(self, extra_env: dict[str, str] | None = None) -> Proc:
        """The PACS router (``python -m xrayfm_router``; its settings: XRAYFM_ORTHANC_URL...)."""
        return self._start("router", [str(VENV_BIN / "python"), "-m", "xrayfm_router"], extra_env)

    def stop(self, proc: Proc, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Signal one process's group and wait for it (SIGKILL after `timeout`)."""
        stop_group(proc.pid, sig, timeout)
        proc.popen.wait(timeout=5)

    def stop_all(self) -> None:
        """Stop every process this object started, the last started first."""
        for proc in reversed(self.procs):
            if proc.alive():
                self.stop(proc)


def orthanc_binary() -> str | None:
    """Orthanc's server, when installed (Debian's ``orthanc`` package: /usr/sbin/Orthanc)."""
    return shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")


def orthanc_answers(url: str, password: str) -> bool:
    """True when the Orthanc at `url` answers ``/system`` to user xrayfm with `password`."""
    request = urllib.request.Request(f"{url}/system")
    token = base64.b64encode(f"{ORTHANC_USER}:{password}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def stop_group(pid: int, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Send `sig` to the process group led by `pid`; SIGKILL the group if still there after `timeout`."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        if _is_zombie(pid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except (OSError, IndexError):
        return False


def wait_until(check, timeout: float, what: str, proc: Proc | None = None, interval: float = 0.2) -> None:
    """Poll `check()` until true; raise with the process's log tail if it died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited ({proc.popen.returncode}) before {what}:\n{proc.log_tail()}"
            )
        time.sleep(interval)
    tail = f":\n{proc.log_tail()}" if proc is not None else ""
    raise TimeoutError(f"{what} not up within {timeout:g} s{tail}")


# -- make up / make down ----------------------------------------------------------------------------------
SAMPLE = REPO / "docs" / "samples" / "paediatric-chest-pneumonia.jpeg"  # the quick start's radiograph
STACK_HOME = REPO / "runs" / "stack"
DEFAULT_STORE = REPO / "runs" / "model-store"
PORT = {"ge": 1, "le": 65535}


class LaunchSettings(StackSettings):
    """What `make up` reads for itself: where it puts the gateway, the web UI and the local PACS (the
    services' own variables are read by their settings objects)."""

    gateway_host: str = Field("127.0.0.1", validation_alias="XRAYFM_GATEWAY_HOST")
    gateway_port: int = Field(8000, validation_alias="XRAYFM_GATEWAY_PORT", **PORT)
    frontend_port: int = Field(8501, validation_alias="XRAYFM_FRONTEND_PORT", **PORT)
    orthanc_port: int = Field(8042, validation_alias="XRAYFM_ORTHANC_PORT", **PORT)  # Orthanc's HTTP
    orthanc_dicom_port: int = Field(4242, validation_alias="XRAYFM_ORTHANC_DICOM_PORT", **PORT)


def model_configured(store: Path, environ: Mapping[str, str] | None = None) -> bool:
    """True when something is set to be served: XRAYFM_MODEL_PATH, or a promoted version in `store`."""
    return InferenceSettings.from_env(environ).model_path is not None or (store / SERVING_FILE).is_file()


def await_first_model(
    stack: Stack,
    gateway_url: str,
    store: Path,
    worker: Proc,
    timeout: float = 1800.0,
    say=print,
    restart_after: float = 20.0,
) -> Proc:
    """Wait for the first-start bootstrap (the training worker installs or trains a model and promotes it).

    Reports /ready's reason as it changes; once the store serves a version, gives the inference worker
    `restart_after` seconds to load it by itself (hot swap) and restarts it otherwise. Returns the
    (possibly new) inference worker; raises TimeoutError / RuntimeError with the reason."""
    deadline, last, promoted_at = time.monotonic() + timeout, None, None
    said, said_at = None, 0.0
    while time.monotonic() < deadline:
        code, body = http_json(f"{gateway_url}/ready")
        if code == 200:
            return worker
        detail = last = body.get("detail", "gateway not answering")
        stage = re.sub(r", step \d+/\d+", "", detail)  # a line per stage, and progress every 15 s
        if stage != said or time.monotonic() - said_at > 15:
            say(f"  /ready: {detail}")
            said, said_at = stage, time.monotonic()
        if detail.startswith("bootstrap failed"):
            raise RuntimeError(detail)
        if (store / SERVING_FILE).is_file():
            promoted_at = promoted_at or time.monotonic()
            if time.monotonic() - promoted_at > restart_after:
                say("  the first model is promoted: restarting the inference worker to load it")
                stack.stop(worker)
                stack.procs.remove(worker)
                worker = stack.start_worker(worker.name)
                promoted_at = time.monotonic() + 60  # leave the new worker time to load
        time.sleep(1.0)
    raise TimeoutError(f"no model served within {timeout:g} s: {last}")


def launch_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables `make up` sets for every process it starts where `environ` (which they also inherit)
    leaves them unset or blank; the processes' settings then read ``{**environ, **launch_env(environ)}``.

    The training side's records and queue must survive a Redis restart: a Redis of their own that keeps an
    append-only file under runs/stack/. The model store lies under runs/; jobs may read the repository's
    data folder. Local development: with no admin key the training and model endpoints are left open
    (compose keeps them closed) unless ``XRAYFM_INSECURE_NO_AUTH`` is set: an explicit 0 keeps them closed
    (403)."""
    env = {
        "XRAYFM_TRAINING_REDIS_URL": "redis://127.0.0.1:6380/0",
        "XRAYFM_MODEL_STORE": str(DEFAULT_STORE),
        "XRAYFM_DATA_DIRS": str(REPO / "data"),
        "XRAYFM_RUNTIME": "onnxruntime",  # the inference worker without torch, as in docker-compose.yml
    }
    if not GatewaySettings.from_env(environ).admin_keys:
        env["XRAYFM_INSECURE_NO_AUTH"] = "1"
    return {name: value for name, value in env.items() if not environ.get(name, "").strip()}


def up() -> int:
    """Start Redis (if needed), one worker, the gateway and the frontend; wait for /ready."""
    if (STACK_HOME / "pids").is_dir() and any(_pid_alive(p) for p in (STACK_HOME / "pids").glob("*.pid")):
        print("the stack is already running (make down first)")
        return 1
    env = launch_env(os.environ)
    environ = {**os.environ, **env}  # what the processes started here read
    settings, launch = GatewaySettings.from_env(environ), LaunchSettings.from_env(environ)
    redis_url, training_redis_url = settings.queue.redis_url, settings.training.redis_url
    gateway_port, frontend_port = launch.gateway_port, launch.frontend_port
    store = settings.model_store
    stack = Stack(STACK_HOME, env=env)
    for url, data_dir in ((redis_url, None), (training_redis_url, STACK_HOME / "redis-training")):
        if redis_answers(url):
            continue
        parsed = urlparse(url)
        if parsed.hostname not in ("127.0.0.1", "localhost"):
            print(f"Redis at {url} does not answer")
            return 1
        kept = f", keeping its data in {data_dir}" if data_dir else ""
        print(f"no Redis at {url}: starting redis-server{kept} (logs in {STACK_HOME / 'logs'})")
        stack.start_redis(parsed.port or 6379, data_dir=data_dir)
    first_start = not model_configured(store, environ)
    stack.start_training_worker()  # with an empty store it queues the first-start bootstrap by itself
    worker = stack.start_worker()
    gateway = stack.start_gateway(gateway_port, host=launch.gateway_host)
    stack.start_frontend(frontend_port, f"http://127.0.0.1:{gateway_port}")
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    pacs = start_local_pacs(stack, gateway_url, environ)
    try:
        if first_start:
            mode = settings.training.bootstrap
            print(f"empty model store {store}: first start, {BOOTSTRAP_MODES[mode]}")
            print(f"  (watch it at {gateway_url}/ready or in the UI; XRAYFM_BOOTSTRAP=off to skip)")
            if mode == "off":
                print("XRAYFM_BOOTSTRAP=off: nothing to serve until you promote a model")
                return 1
            worker = await_first_model(stack, gateway_url, store, worker)
        wait_until(lambda: http_json(f"{gateway_url}/ready")[0] == 200, 120, "/ready", worker)
    except (TimeoutError, RuntimeError) as exc:
        print(f"the stack started but is not ready: {exc}\nsee {STACK_HOME / 'logs'}")
        return 1
    del gateway
    print(f"gateway   http://127.0.0.1:{gateway_port}  (docs: /docs, metrics: /metrics)")
    print(f"frontend  http://127.0.0.1:{frontend_port}")
    print(  # the shipped sample, relative to the repository root (where make up runs)
        f'try: curl -X POST "http://127.0.0.1:{gateway_port}/predict" -F "file=@{SAMPLE.relative_to(REPO)}"'
    )
    if not settings.admin_keys:
        opened = settings.insecure_no_auth
        state = "OPEN (local development only)" if opened else "closed (403; XRAYFM_INSECURE_NO_AUTH is off)"
        print(f"training and model endpoints: {state}: no XRAYFM_ADMIN_KEYS")
    print(pacs)
    print(f"audit log {settings.audit_log} (check it: xrayfm audit verify {settings.audit_log})")
    print(f"logs in {STACK_HOME / 'logs'}; stop with: make down")
    return 0


def start_local_pacs(stack: Stack, gateway_url: str, environ: Mapping[str, str]) -> str:
    """When Orthanc is installed: a local Orthanc (configuration and storage in runs/stack/orthanc/; its
    password XRAYFM_ORTHANC_PASSWORD, else generated once into runs/stack/orthanc/password) and the router
    following it. `environ`: what the processes read. What was started, in words (or why not)."""
    if orthanc_binary() is None:
        return (
            "PACS: skipped, Orthanc is not installed (apt-get install orthanc orthanc-dicomweb orthanc-gdcm)"
        )
    folder = STACK_HOME / "orthanc"
    folder.mkdir(parents=True, exist_ok=True)
    secret = folder / "password"
    router, launch = RouterSettings.from_env(environ), LaunchSettings.from_env(environ)
    if router.orthanc_password:
        secret.write_text(router.orthanc_password)
    elif not secret.is_file():
        secret.write_text(secrets.token_hex(16))
    secret.chmod(0o600)
    http_port, dicom_port = launch.orthanc_port, launch.orthanc_dicom_port
    busy = [port for port in (http_port, dicom_port) if port_open("127.0.0.1", port)]
    if busy:  # e.g. Debian's own orthanc service: `systemctl disable --now orthanc`
        return f"PACS: skipped, port {busy[0]} is taken (XRAYFM_ORTHANC_PORT, XRAYFM_ORTHANC_DICOM_PORT)"
    stack.start_orthanc(folder, http_port, dicom_port, secret.read_text().strip())
    keys = sorted(GatewaySettings.from_env(environ).api_keys)
    stack.start_router({
        "XRAYFM_ORTHANC_URL": f"http://127.0.0.1:{http_port}", "XRAYFM_ORTHANC_PASSWORD_FILE": str(secret),
        "XRAYFM_GATEWAY_URL": gateway_url, "XRAYFM_ROUTER_API_KEY": router.api_key or (keys[0] if keys else ""),
    })  # fmt: skip
    return (
        f"PACS      http://127.0.0.1:{http_port} (Orthanc: user {ORTHANC_USER}, password in {secret}), DICOM "
        f"127.0.0.1:{dicom_port} AE XRAYFMPACS; the router answers its new studies into them"
    )


def _pid_alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def down() -> int:
    """Stop every process whose pid file `up` wrote (their whole process groups)."""
    pids = STACK_HOME / "pids"
    files = sorted(pids.glob("*.pid")) if pids.is_dir() else []
    order = {"router": 0, "frontend": 0, "gateway": 1, "worker": 2, "trainer": 3}
    for pidfile in sorted(files, key=lambda p: order.get(p.stem, 4 if p.stem.startswith("orthanc") else 3)):
        try:
            pid = int(pidfile.read_text())
        except ValueError:
            pid = 0
        if pid and _pid_alive(pidfile):
            print(f"stopping {pidfile.stem} (pid {pid})")
            stop_group(pid)
        pidfile.unlink()
    if not files:
        print("nothing to stop")
    return 0


def status() -> int:
    """Print which stack processes are alive and what /ready says."""
    pids = STACK_HOME / "pids"
    for pidfile in sorted(pids.glob("*.pid")) if pids.is_dir() else []:
        print(f"{pidfile.stem:10s} {'running' if _pid_alive(pidfile) else 'dead'}")
    port = LaunchSettings.from_env().gateway_port
    print("ready:", http_json(f"http://127.0.0.1:{port}/ready"))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m xrayfm_local up|down|status``; a wrong ``XRAYFM_*`` value is said, not raised."""
    parser = argparse.ArgumentParser(
        prog="python -m xrayfm_local",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    try:
        return {"up": up, "down": down, "status": status}[args.command]()
    except XrayfmError as exc:
        print(f"{args.command}: {exc}")
        return 2

"""The stack's boundaries: services (and the local launcher, xrayfm_local) import the contracts package
(xrayfm_stack) and the library, never each other; the gateway, the web UI, the contracts and the launcher run
without torch. The layers themselves: tests/test_layers.py (STACK_LAYERS)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVICES = {p.parent.name: p.parent for p in REPO.glob("services/*/xrayfm_*/__init__.py")}
CONTRACTS = "xrayfm_stack"
HEAVY = ("torch", "torchvision", "timm", "peft", "transformers")


def imported_modules(package: Path) -> dict[str, set[str]]:
    """Every module each file of `package` imports (top-level and inside functions), by file."""
    found: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(REPO))] = names
    return found


def test_the_seven_packages_are_there():
    assert set(SERVICES) == {
        CONTRACTS,
        "xrayfm_gateway",
        "xrayfm_inference",
        "xrayfm_training",
        "xrayfm_frontend",
        "xrayfm_router",
        "xrayfm_local",
    }


@pytest.mark.parametrize("package", sorted(SERVICES))
def test_no_service_imports_another_service(package):
    allowed = {package, CONTRACTS} if package != CONTRACTS else {CONTRACTS}
    offenders = {
        f"{path}: {name}"
        for path, names in imported_modules(SERVICES[package]).items()
        for name in names
        if name.split(".")[0] in SERVICES and name.split(".")[0] not in allowed
    }
    assert not offenders, f"{package} imports other services: {sorted(offenders)}"


def test_the_library_imports_no_service():
    offenders = {
        f"{path}: {name}"
        for path, names in imported_modules(REPO / "shared/src/xrayfm").items()
        for name in names
        if name.split(".")[0] in SERVICES
    }
    assert not offenders, sorted(offenders)


def run_without_torch(code: str, also: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where importing torch, timm, peft... (and `also`) fails."""
    prelude = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in (*HEAVY, *also))
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=300
    )


def test_contracts_gateway_and_frontend_import_without_torch():
    result = run_without_torch(
        """
        import xrayfm_local.launcher, xrayfm_stack.celery, xrayfm_stack.jobs, xrayfm_stack.protocol
        import xrayfm_stack.settings, xrayfm_stack.spec, xrayfm_stack.store
        import xrayfm_gateway.app
        app = xrayfm_gateway.app.create_app()
        assert "/predict" in app.openapi()["paths"]
        import xrayfm_frontend.client, xrayfm_frontend.render, xrayfm_frontend.training_page
        import xrayfm_frontend.studies_page
        import xrayfm_router.follow, xrayfm_stack.results  # the router's image has no torch either
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_gateway_imports_without_matplotlib():
    """The gateway image installs no matplotlib (the frontend's overlays need it, the gateway does not)."""
    result = run_without_torch(
        """
        import xrayfm_gateway.app
        assert "/feedback" in xrayfm_gateway.app.create_app().openapi()["paths"]
        print("ok")
        """,
        also=("matplotlib",),
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.slow
def test_frontend_app_runs_without_torch(tmp_path):
    """The Streamlit script itself, run by Streamlit's AppTest with torch unavailable (no gateway: it
    shows the not-ready message)."""
    app = REPO / "services/frontend/xrayfm_frontend/app.py"
    result = run_without_torch(
        f"""
        import os
        os.environ["XRAYFM_GATEWAY_URL"] = "http://127.0.0.1:9"
        from streamlit.testing.v1 import AppTest
        at = AppTest.from_file({str(app)!r}, default_timeout=60).run()
        assert not at.exception, at.exception
        print("ok" if any("not ready" in w.value for w in at.sidebar.warning) else [w.value for w in at.warning])
        """
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        result.stdout,
        result.stderr[-3000:],
    )

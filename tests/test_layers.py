"""The library's layers: no import runs back up, and the CLI and the torch-free modules stay light. And the
stack's packages above it (``STACK_LAYERS``): the library, the contracts, the services and the launcher.

Layers, lowest first: errors/utils -> data -> models -> train/evaluate -> explain -> inference ->
commands/cli. Layer 0 also holds the self-contained modules that need nothing above errors/utils (the
registry of shipped names, the audit log, feedback records, operating points, the hospital formats). A
module may import its own layer and the ones below, never one above, and nothing in ``xrayfm`` imports a
service (``xrayfm_*``). Every module belongs to a layer named for it or its subpackage in ``LAYERS``: a new
module is placed there explicitly. Checked twice: statically over every import statement (function-local
ones too), and by importing each layer in a fresh interpreter and reading sys.modules.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import REPO

SOURCE = REPO / "shared" / "src"
PACKAGE = SOURCE / "xrayfm"

# Module or subpackage -> layer; a module belongs to the longest entry that is it or a package above it.
# "xrayfm" is the package's own __init__ only: every module below it needs an entry of its own.
ROOT = "xrayfm"
LAYERS = {
    ROOT: 0,
    "xrayfm.errors": 0,
    "xrayfm.utils": 0,
    "xrayfm.registry": 0,
    "xrayfm.audit": 0,
    "xrayfm.feedback": 0,
    "xrayfm.operating_point": 0,
    "xrayfm.hospital": 0,
    "xrayfm.data": 1,
    "xrayfm.models": 2,
    "xrayfm.train": 3,
    "xrayfm.evaluate": 3,
    "xrayfm.domain": 3,
    "xrayfm.explain": 4,
    "xrayfm.inference": 5,
    "xrayfm.commands": 6,
    "xrayfm.cli": 6,
}
HEAVY = ("torch", "torchvision", "timm", "peft", "transformers", "matplotlib", "sklearn")


def layer_of(module: str) -> int:
    """The layer of an ``xrayfm`` module: its own entry in LAYERS, else its nearest package's (never the
    root's, which is the package's __init__ alone). KeyError for a module with no layer."""
    if module == ROOT:
        return LAYERS[ROOT]
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise KeyError(module)


def module_name(path: Path) -> str:
    """``shared/src/xrayfm/data/cache/build.py`` -> ``xrayfm.data.cache.build``."""
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_in(text: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every import in a module's source, function-local ones included.

    Relative imports are resolved, and ``from xrayfm.data import cache`` also counts as an import of
    ``xrayfm.data.cache`` (names that are not modules are ignored by the caller).
    """
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def library_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    unplaced = []
    for path in library_files():
        try:
            layer_of(module_name(path))
        except KeyError:
            unplaced.append(str(path.relative_to(REPO)))
    assert not unplaced, f"modules with no layer (add them to LAYERS): {unplaced}"


def test_a_new_module_without_a_layer_fails_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: a new top-level module (or subpackage) has no layer until it is given one;
    a new module inside a placed subpackage has its subpackage's."""
    new = [PACKAGE / "newcomer.py", PACKAGE / "newpackage" / "__init__.py"]
    monkeypatch.setattr(sys.modules[__name__], "library_files", lambda: [PACKAGE / "data" / "new.py", *new])
    with pytest.raises(AssertionError, match="newcomer.py.*newpackage/__init__.py"):
        test_every_module_has_a_layer()
    assert layer_of("xrayfm.data.new") == LAYERS["xrayfm.data"] and layer_of(ROOT) == 0
    with pytest.raises(KeyError):
        layer_of("xrayfm.newcomer")


def test_no_import_points_to_a_higher_layer_or_a_service() -> None:
    problems = []
    for path in library_files():
        source = module_name(path)
        for line, target in imports_in(path.read_text(), source, path.name == "__init__.py"):
            where = f"{path.relative_to(REPO)}:{line}"
            if target.split(".")[0].startswith("xrayfm_"):
                problems.append(f"{where} imports the service package {target}")
            elif target == "xrayfm" or target.startswith("xrayfm."):
                try:
                    target_layer = layer_of(target)
                except KeyError:  # `from xrayfm.data import open_dataset`: a name, not a module
                    continue
                if target_layer > layer_of(source):
                    problems.append(f"{where} ({source}) imports {target}, a higher layer")
    assert not problems, "\n".join(problems)


def test_import_checker_sees_local_and_relative_imports() -> None:
    """The static check itself: function-local, `from X import submodule` and relative imports count."""
    text = "def f():\n    from xrayfm.inference import Predictor\n\nfrom . import cache\nfrom ..explain import api\n"
    found = {module for _, module in imports_in(text, "xrayfm.data.probe")}
    assert {"xrayfm.inference", "xrayfm.data.cache", "xrayfm.explain.api"} <= found
    assert layer_of("xrayfm.inference") > layer_of("xrayfm.data.probe")


# -- fresh interpreters -----------------------------------------------------------------------------------
def fresh_modules(code: str, block_torch: bool = False, block: tuple[str, ...] = ()) -> set[str]:
    """Run `code` in a new interpreter (with torch and the `block` packages made unimportable); return
    the names in its sys.modules afterwards."""
    blocked = (("torch",) if block_torch else ()) + block
    prelude = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
    epilogue = "\nimport json\nprint(json.dumps(sorted(sys.modules)))\n"
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code) + epilogue],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def import_with_submodules(package: str) -> str:
    """Code that imports a package and every module below it."""
    return f"""
    import importlib, pkgutil
    root = importlib.import_module({package!r})
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), prefix={package!r} + "."):
        importlib.import_module(info.name)
    """


def higher(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in packages))


ABOVE = {
    "xrayfm.data": ("xrayfm.models", "xrayfm.train", "xrayfm.evaluate", "xrayfm.explain", "xrayfm.inference",
                    "xrayfm.commands", "xrayfm.cli"),
    "xrayfm.models": ("xrayfm.train", "xrayfm.evaluate", "xrayfm.explain", "xrayfm.inference",
                      "xrayfm.commands", "xrayfm.cli"),
    "xrayfm.train": ("xrayfm.explain", "xrayfm.inference", "xrayfm.commands", "xrayfm.cli"),
    "xrayfm.evaluate": ("xrayfm.explain", "xrayfm.inference", "xrayfm.commands", "xrayfm.cli"),
    "xrayfm.explain": ("xrayfm.inference", "xrayfm.commands", "xrayfm.cli"),
    "xrayfm.inference": ("xrayfm.commands", "xrayfm.cli"),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("package", list(ABOVE))
def test_a_layer_pulls_in_no_higher_layer(package: str) -> None:
    """`import PACKAGE` and every module below it (a superset of what `import PACKAGE` alone loads)."""
    modules = fresh_modules(import_with_submodules(package))
    assert package in modules
    assert not higher(modules, ABOVE[package]), f"{package}.* pulled in {higher(modules, ABOVE[package])}"


@pytest.mark.slow
def test_nothing_in_the_library_pulls_in_a_service() -> None:
    modules = fresh_modules(import_with_submodules("xrayfm"))
    assert "xrayfm.commands.explain_eval" in modules  # the walk did reach the top layer
    assert not [m for m in modules if m.startswith("xrayfm_")]


@pytest.mark.slow
def test_the_cli_builds_every_parser_without_heavy_imports() -> None:
    modules = fresh_modules(
        """
        import argparse, contextlib, io
        from xrayfm.cli import build_parser, main

        def leaves(parser, prefix=()):
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for name, sub in action.choices.items():
                        yield (*prefix, name)
                        yield from leaves(sub, (*prefix, name))

        for command in [(), *leaves(build_parser())]:  # what `xrayfm [COMMAND ...] --help` runs
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
                main([*command, "--help"])
        """
    )
    assert "xrayfm.commands.train" in modules and "xrayfm.commands.explain" in modules
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert not heavy, f"xrayfm --help imported {heavy}"


@pytest.mark.slow
@pytest.mark.parametrize("module", ["xrayfm.explain.overlay", "xrayfm.explain.methods", "xrayfm.data.images"])
def test_torch_free_modules_import_without_torch(module: str) -> None:
    modules = fresh_modules(
        f"""
        import {module}
        if {module!r} == "xrayfm.explain.overlay":
            import numpy as np
            from xrayfm.explain.overlay import make_overlay
            image = np.zeros((20, 30), dtype=np.uint8)
            assert make_overlay(image, np.eye(4, dtype=np.float32)).rgb.shape == (20, 30, 3)
        """,
        block_torch=True,
    )
    assert module in modules


@pytest.mark.slow
def test_the_gateway_draws_heatmaps_without_torch_or_matplotlib() -> None:
    """The gateway's image has neither: it must import, and draw a worker's map, without them."""
    modules = fresh_modules(
        """
        import base64, io
        import numpy as np
        from PIL import Image
        import xrayfm_gateway.app
        from xrayfm_gateway.drawing import draw_map
        from xrayfm_stack.protocol import ModelMap

        heat = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
        png = base64.b64decode(draw_map(ModelMap.from_array(heat, 64, "pad", (30, 20))))
        assert np.asarray(Image.open(io.BytesIO(png))).shape == (30, 20)
        """,
        block_torch=True,
        block=("matplotlib",),
    )
    assert "xrayfm_gateway.app" in modules and "xrayfm.explain.overlay" in modules


# -- the stack's packages ---------------------------------------------------------------------------------
# Top-level package -> layer, lowest first: the library; the contracts every service shares (xrayfm_stack);
# the services and the local launcher (xrayfm_local, which starts the services as processes). A package
# imports its own modules and lower layers only, never another package of its own layer.
STACK_LAYERS = {
    "xrayfm": 0,
    "xrayfm_stack": 1,
    "xrayfm_gateway": 2,
    "xrayfm_inference": 2,
    "xrayfm_training": 2,
    "xrayfm_frontend": 2,
    "xrayfm_router": 2,
    "xrayfm_local": 2,
}
# The contracts hold the wire models and their thin conversions: decoding uploads and drawing heatmaps are
# the library's, used by the services themselves.
NOT_IN_CONTRACTS = ("xrayfm.data.images", "xrayfm.explain.overlay", "PIL", "pydicom.pixels", "matplotlib")


def stack_packages() -> dict[str, Path]:
    """Every ``services/*/xrayfm_*`` package by name."""
    return {p.parent.name: p.parent for p in sorted((REPO / "services").glob("*/xrayfm_*/__init__.py"))}


def stack_offences(files: dict[str, str]) -> list[str]:
    """What breaks the stack's layering in `files` (path -> source, under ``<package>/``), one line per
    import statement: an import of a package of the same or a higher layer, or, in the contracts, of
    decoding or drawing code."""
    problems: dict[tuple[str, int], str] = {}
    for path, text in files.items():
        package = Path(path).parts[0]
        for line, target in imports_in(text, package):  # `from a import b` gives a and a.b: one is said
            top, where = target.split(".")[0], f"{path}:{line}"
            if top in STACK_LAYERS and top != package and STACK_LAYERS[top] >= STACK_LAYERS[package]:
                problems.setdefault((path, line), f"{where} imports {target}, not of a layer below its own")
            elif package == "xrayfm_stack" and any(
                target == m or target.startswith(m + ".") for m in NOT_IN_CONTRACTS
            ):
                problems.setdefault((path, line), f"{where} imports {target}: decoding or drawing code")
    return list(problems.values())


def test_every_stack_package_has_a_layer() -> None:
    found = set(stack_packages())
    assert "xrayfm_local" in found and "xrayfm_stack" in found
    assert not found - set(STACK_LAYERS), (
        f"packages with no layer (add them to STACK_LAYERS): {found - set(STACK_LAYERS)}"
    )


def test_stack_packages_import_only_lower_layers_and_contracts_neither_decode_nor_draw() -> None:
    files = {
        str(Path(name) / path.relative_to(folder)): path.read_text()
        for name, folder in stack_packages().items()
        for path in folder.rglob("*.py")
    }
    assert not stack_offences(files), "\n".join(stack_offences(files))


def test_the_stack_check_can_fail() -> None:
    bad = {
        "xrayfm_stack/protocol.py": "from xrayfm.data.images import read_image\n",
        "xrayfm_stack/draw.py": "def f():\n    from xrayfm.explain.overlay import heatmap_on_image\n",
        "xrayfm_local/launcher.py": "import xrayfm_gateway.app\n",
        "xrayfm_stack/celery.py": "from xrayfm_inference import worker\n",
        "xrayfm_gateway/app.py": "from xrayfm_stack.protocol import PROTOCOL_VERSION\nimport PIL.Image\n",
    }
    problems = stack_offences(bad)
    assert len(problems) == 4, problems  # the gateway may decode and draw; the rest may not do what they do
    assert not any(p.startswith("xrayfm_gateway") for p in problems)


@pytest.mark.slow
def test_importing_the_contracts_loads_no_decoding_or_drawing_code() -> None:
    modules = fresh_modules(import_with_submodules("xrayfm_stack"))
    assert "xrayfm_stack.protocol" in modules and "xrayfm_stack.settings" in modules
    loaded = sorted(m for m in modules if m in ("xrayfm.data.images", "xrayfm.explain.overlay"))
    assert not loaded, f"importing xrayfm_stack loaded {loaded}"

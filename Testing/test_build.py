"""The build files: every file the CMake lists name exists, every engine module is listed,
the extension metadata is complete, and the two commands (make demo / make test) are wired."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import REPO

MODULE_DIR = REPO / "ParotidOAR"


# --- a small CMake reader (commands, quoted arguments, comments, ${VAR} expansion) --------------


def _strip_comments(text: str) -> str:
    out, in_quote = [], False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == '"' and (i == 0 or text[i - 1] != "\\"):
            in_quote = not in_quote
        if ch == "#" and not in_quote:
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _commands(path: Path) -> list[tuple[str, list[str]]]:
    """``[(command_name_lower, [arguments...]), ...]`` with quotes removed."""
    text = _strip_comments(path.read_text())
    result = []
    for m in re.finditer(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(((?:[^()\"]|\"[^\"]*\")*)\)", text, flags=re.S):
        args = [a[1:-1] if a.startswith('"') else a for a in re.findall(r"\"[^\"]*\"|[^\s\"]+", m.group(2))]
        result.append((m.group(1).lower(), args))
    return result


def _variables(commands) -> dict[str, list[str]]:
    variables: dict[str, list[str]] = {}
    for name, args in commands:
        if name == "set" and args:
            variables[args[0]] = [_expand(a, variables) for a in args[1:]]
    return variables


def _expand(value: str, variables) -> str:
    return re.sub(r"\$\{([A-Za-z0-9_]+)\}", lambda m: " ".join(variables.get(m.group(1), [m.group(0)])), value)


def _set_values(path: Path, var: str) -> list[str]:
    variables = _variables(_commands(path))
    assert var in variables, f"{path.relative_to(REPO)} does not set {var}"
    return variables[var]


def _missing(paths, base: Path) -> list[str]:
    return [p for p in paths if not (base / p).is_file()]


# --- the module CMakeLists -----------------------------------------------------------------------


def test_module_cmake_lists_existing_files():
    cmake = MODULE_DIR / "CMakeLists.txt"
    scripts = _set_values(cmake, "MODULE_PYTHON_SCRIPTS")
    resources = _set_values(cmake, "MODULE_PYTHON_RESOURCES")
    assert "ParotidOAR.py" in scripts
    assert "Resources/Icons/ParotidOAR.png" in resources and "Resources/UI/ParotidOAR.ui" in resources
    missing = _missing(scripts + resources, MODULE_DIR)
    assert not missing, f"listed in ParotidOAR/CMakeLists.txt but missing on disk: {missing}"
    assert len(scripts) == len(set(scripts)), "a script is listed twice"
    names = [n for n, _ in _commands(cmake)]
    assert "slicermacrobuildscriptedmodule" in names


def test_every_engine_module_is_listed():
    scripts = {str((MODULE_DIR / s).resolve()) for s in _set_values(MODULE_DIR / "CMakeLists.txt",
                                                                      "MODULE_PYTHON_SCRIPTS")}
    engine = sorted(p for p in (REPO / "ParotidOARLib").rglob("*.py") if "__pycache__" not in p.parts)
    assert engine, "no engine modules found"
    unlisted = [str(p.relative_to(REPO)) for p in engine if str(p.resolve()) not in scripts]
    assert not unlisted, ("add these to MODULE_PYTHON_SCRIPTS in ParotidOAR/CMakeLists.txt (as ../<path>): "
                          + ", ".join(unlisted))


def test_gui_package_files_are_listed():
    gui = MODULE_DIR / "ParotidOARGui"
    if not gui.is_dir():
        pytest.skip("no ParotidOARGui package")
    scripts = {str((MODULE_DIR / s).resolve()) for s in _set_values(MODULE_DIR / "CMakeLists.txt",
                                                                      "MODULE_PYTHON_SCRIPTS")}
    unlisted = [str(p.relative_to(REPO)) for p in sorted(gui.rglob("*.py"))
                if "__pycache__" not in p.parts and str(p.resolve()) not in scripts]
    assert not unlisted, f"add these to MODULE_PYTHON_SCRIPTS: {', '.join(unlisted)}"


def test_testing_cmake_files_exist():
    """Every add_subdirectory resolves to a folder with a CMakeLists.txt, every unittest script exists."""
    pending = [MODULE_DIR / "CMakeLists.txt"]
    seen = []
    while pending:
        cmake = pending.pop()
        seen.append(cmake)
        for name, args in _commands(cmake):
            if name == "add_subdirectory":
                sub = cmake.parent / args[0]
                assert (sub / "CMakeLists.txt").is_file(), f"{cmake.relative_to(REPO)}: add_subdirectory({args[0]})"
                pending.append(sub / "CMakeLists.txt")
            if name == "slicer_add_python_unittest":
                script = args[args.index("SCRIPT") + 1]
                variables = _variables(_commands(cmake))
                script = _expand(script, variables)
                if not script.startswith("$"):
                    assert (cmake.parent / script).is_file(), f"{cmake.relative_to(REPO)}: {script} missing"
    assert MODULE_DIR / "Testing" / "CMakeLists.txt" in seen


# --- the top-level extension ---------------------------------------------------------------------


def test_extension_metadata():
    top = REPO / "CMakeLists.txt"
    commands = _commands(top)
    v = _variables(commands)

    def one(name):
        assert name in v and v[name] and " ".join(v[name]).strip(), f"{name} is not set"
        return " ".join(v[name])

    assert re.match(r"https?://", one("EXTENSION_HOMEPAGE"))
    assert one("EXTENSION_CATEGORY") == "Segmentation"
    assert one("EXTENSION_CONTRIBUTORS")
    description = one("EXTENSION_DESCRIPTION")
    assert "parotid" in description.lower() and "not for clinical use" in description.lower()
    icon = one("EXTENSION_ICONURL")
    assert re.match(r"https?://.+\.png$", icon)
    assert icon.endswith("ParotidOAR/Resources/Icons/ParotidOAR.png")  # the icon we ship
    for url in v["EXTENSION_SCREENSHOTURLS"]:
        assert re.match(r"https?://.+\.(png|jpg)$", url)
    assert "EXTENSION_DEPENDS" in v and v["EXTENSION_DEPENDS"]
    assert ("project", ["ParotidOAR"]) in commands
    assert ("add_subdirectory", ["ParotidOAR"]) in commands
    names = [n for n, _ in commands]
    for required in ("find_package", "include"):
        assert required in names
    assert any(n == "include" and "${Slicer_EXTENSION_CPACK}" in a for n, a in commands)


def test_icon_is_a_128px_png():
    from PIL import Image

    path = MODULE_DIR / "Resources" / "Icons" / "ParotidOAR.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (128, 128)


# --- make demo / make test / CI --------------------------------------------------------------------


def _make_rules(text: str) -> dict[str, tuple[list[str], list[str]]]:
    rules: dict[str, tuple[list[str], list[str]]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("\t") and current is not None:
            rules[current][1].append(line.strip())
            continue
        m = re.match(r"^([^\s:=#][^:=]*?)\s*:(?!=)\s*(.*)$", line)
        if m and not line.startswith("."):
            current = m.group(1).strip()
            rules[current] = (m.group(2).split(), [])
        elif line.strip() and not line.startswith("#"):
            current = None
    return rules


def _recipe_with_prerequisites(rules, target, seen=None) -> list[str]:
    seen = seen or set()
    if target in seen or target not in rules:
        return []
    seen.add(target)
    prereqs, recipe = rules[target]
    lines = list(recipe)
    for p in prereqs:
        lines += _recipe_with_prerequisites(rules, p, seen)
    return lines


def test_makefile_demo_and_test_targets():
    rules = _make_rules((REPO / "Makefile").read_text())
    for target in ("demo", "test"):
        assert target in rules, f"Makefile has no '{target}' target"
        lines = _recipe_with_prerequisites(rules, target)
        text = "\n".join(lines)
        assert "torch==2.13.0" in text, f"make {target} must install the pinned torch==2.13.0"
        assert "-m venv" in text, f"make {target} must create .venv"
        assert "requirements" in text
    assert any("ParotidOARLib demo" in line for line in rules["demo"][1])
    assert any("pytest" in line and "Testing" in line for line in rules["test"][1])


def test_requirements_pin_compatible_versions():
    req = (REPO / "requirements.txt").read_text()
    test_req = (REPO / "requirements-test.txt").read_text()
    assert re.search(r"^torch==2\.13\.0\s*$", req, flags=re.M)
    assert "-r requirements.txt" in test_req
    assert re.search(r"^vtk==9\.6\.2\s*$", test_req, flags=re.M)  # slicer-core pins vtk 9.6.2
    assert re.search(r"^slicer-core", test_req, flags=re.M) and re.search(r"^pytest", test_req, flags=re.M)
    for line in (req + "\n" + test_req).splitlines():
        if line.strip().startswith("vtk"):
            assert line.strip() == "vtk==9.6.2"


def test_ci_runs_make_test():
    ci = REPO / ".ci" / "run"
    text = ci.read_text()
    commands = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert "make test" in commands
    assert "set -euo pipefail" in text or "set -e" in text


def test_readme_starts_with_the_two_commands():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no command block"
    first = [line.split("#")[0].strip() for line in blocks[0].splitlines() if line.split("#")[0].strip()]
    assert first[:2] == ["make demo", "make test"]

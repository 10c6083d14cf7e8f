"""Source-level rules: no unsafe deserialisation anywhere, no hard-coded dtype/device in plugins,
and the core never imports a plugin (nor a plugin another plugin)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "fixtures" not in p.parts]
PLUGIN_SOURCES = [p for p in (ROOT / "plugins").glob("*/src/**/*.py")]

UNSAFE = {
    "pickle.load": re.compile(r"\bpickle\.loads?\("),
    "yaml.load": re.compile(r"\byaml\.load\("),
    "eval(": re.compile(r"(?<![\w.])eval\("),
    "exec(": re.compile(r"(?<![\w.])exec\("),
    "weights_only=False": re.compile(r"weights_only\s*=\s*False"),
    "torch.load without weights_only": re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)[^)]*\)"),
}
#: Reviewed exceptions: the docs test executes the Python blocks of our own documentation.
ALLOWED = {("tests/unit/test_docs.py", "exec(")}
HARD_CODED = re.compile(
    r"torch\.(float16|bfloat16|float32|half|float64)\b|\.half\(\)|\.bfloat16\(\)|\.cuda\(|[\"']cuda(:\d)?[\"']"
)


def _code_lines(path: Path) -> list[tuple[int, str]]:
    lines = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.split("#", 1)[0]
        if stripped.strip():
            lines.append((number, stripped))
    return lines


def test_sources_were_found() -> None:
    assert len(SOURCES) > 20 and PLUGIN_SOURCES


def test_no_unsafe_deserialisation_or_eval() -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {name}"
        for path in SOURCES
        if path.name != "test_source_rules.py"
        for n, line in _code_lines(path)
        for name, pattern in UNSAFE.items()
        if pattern.search(line) and (str(path.relative_to(ROOT)), name) not in ALLOWED
    ]
    assert not hits, "\n".join(hits)


def test_plugins_ask_the_precision_policy_for_dtypes_and_devices() -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in PLUGIN_SOURCES
        for n, line in _code_lines(path)
        if HARD_CODED.search(line)
    ]
    assert not hits, "hard-coded dtype/device in plugins (ask run.precision / run.device):\n" + "\n".join(hits)


def test_core_never_imports_a_plugin_and_plugins_never_import_each_other() -> None:
    plugin_modules = {p.name for p in (ROOT / "plugins").glob("*/src/*") if p.is_dir() and p.name.startswith("prx_")}
    pattern = re.compile(r"^\s*(?:from|import)\s+(prx_\w+)", re.MULTILINE)
    problems = []
    for path in SOURCES:
        rel = path.relative_to(ROOT)
        if rel.parts[0] == "plugins":
            own = {p.name for p in (ROOT / "plugins" / rel.parts[1] / "src").glob("prx_*")}
        elif rel.parts[0] == "prx_core":
            own = set()
        else:
            continue  # tests and benchmarks may exercise any plugin
        for imported in pattern.findall(path.read_text(encoding="utf-8")):
            if imported in plugin_modules and imported not in own:
                problems.append(f"{rel} imports plugin module {imported}")
    assert not problems, "\n".join(problems)

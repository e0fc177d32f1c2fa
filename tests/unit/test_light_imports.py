"""The workflow's parse-time imports are light: nothing heavier than pandas (issue 19, point 4).

Snakemake runs the Snakefile and rules/*.smk on every invocation, `-n` included, so whatever they import at
module level is paid before any job is planned. The heavy libraries are imported by the rules' scripts
only. The imports checked are read from the workflow files themselves, so a new parse-time import is
covered without editing this test.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("SimpleITK", "torch", "zarr", "h5py", "skimage", "scipy")
IMPORT = re.compile(r"^(\s*)(from\s+histodistill\S*\s+import\s+.+|import\s+histodistill\S*.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def parse_time_imports(path: Path) -> list[str]:
    """The `histodistill` import statements of a workflow file that run when it is parsed (those inside a
    `def` run only when the function is called)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for i, line in enumerate(lines):
        match = IMPORT.match(line)
        if not match:
            continue
        indent, lazy = len(match.group(1)), False
        for above in reversed(lines[:i]):  # the enclosing blocks, innermost first
            if above.strip() and not above.lstrip().startswith("#") and _indent(above) < indent:
                indent = _indent(above)
                lazy = lazy or above.lstrip().startswith("def ")
        if not lazy:
            statement, j = match.group(2).strip(), i
            while statement.count("(") > statement.count(")"):  # a parenthesised multi-line import
                j += 1
                statement += " " + lines[j].strip()
            found.append(statement)
    return found


def test_the_parser_finds_module_level_imports_and_skips_function_level_ones(tmp_path):
    smk = tmp_path / "x.smk"
    smk.write_text(
        "from histodistill.config import a\n"
        "from histodistill.mpp import (\n    b,\n    c,\n)\n"
        "if x:\n    import histodistill.slides\n"
        "def f():\n    if y:\n        from histodistill.distill.trainer import DistillConfig\n"
    )
    assert parse_time_imports(smk) == [
        "from histodistill.config import a",
        "from histodistill.mpp import ( b, c, )",
        "import histodistill.slides",
    ]


def test_workflow_parse_time_imports_pull_in_no_heavy_library():
    statements = ["import histodistill.config"]
    for path in [ROOT / "Snakefile", *sorted((ROOT / "rules").glob("*.smk"))]:
        statements += parse_time_imports(path)
    assert any("histodistill.models.ref" in s for s in statements)  # the scan found common.smk's helpers
    assert any("read_plism_manifest" in s for s in statements)  # and its multi-line import
    code = "\n".join(
        [
            "import sys",
            *statements,
            f"print(','.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))",
        ]
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, timeout=120
    )
    heavy = out.stdout.strip()
    assert heavy == "", f"parse-time imports {statements} pull in {heavy}; import them inside the functions"


@pytest.mark.parametrize("module", ["histodistill.mpp", "histodistill.models.ref"])
def test_light_helper_modules_pull_in_no_heavy_library(module):
    code = f"import sys, {module}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == ""


def test_head_defaults_are_distill_configs():
    """The parse-time check of teacher-head dimensions uses DistillConfig's defaults (one source)."""
    from histodistill.config import DISTILL_HEAD_DEFAULTS
    from histodistill.distill.trainer import DistillConfig

    assert {k: getattr(DistillConfig(), k) for k in DISTILL_HEAD_DEFAULTS} == DISTILL_HEAD_DEFAULTS


_PARSE_STATE = """
import gc, json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, Quietness, ResourceSettings, StorageSettings

repo, workdir = Path(sys.argv[1]), Path(sys.argv[2])
with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
    g = api.workflow(
        resource_settings=ResourceSettings(),
        config_settings=ConfigSettings(configfiles=[repo / "config.yaml"]),
        storage_settings=StorageSettings(),
        snakefile=repo / "Snakefile",
        workdir=workdir,
    )._workflow.globals
    sheet = g["PLISM_SLIDES"]
    lookups = [
        [g["plism_path"](s), sheet.loc[s, "path"], g["plism_mpp"](s), g["parse_mpp"](sheet.loc[s, "mpp"])]
        for s in sheet["slide_id"]
    ]
print(json.dumps({"frozen": gc.get_freeze_count(), "lookups": lookups}))
"""


def test_the_parse_freezes_snakemakes_objects_and_plism_lookups_match_the_manifest(tmp_path):
    """The Snakefile moves the objects Snakemake made before it out of the cyclic GC's reach (gc.freeze:
    each full collection during the parse and the DAG then skips them), and the PLISM helpers' dict
    lookups give what the manifest's DataFrame does (path, and mpp: None where the manifest has none)."""
    import json
    import os
    import shutil

    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    out = subprocess.run(
        [sys.executable, "-c", _PARSE_STATE, str(ROOT), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state["frozen"] > 10_000  # Snakemake's imports: ~100,000 objects
    assert len(state["lookups"]) >= 4
    for path, loc_path, mpp, loc_mpp in state["lookups"]:
        assert path == loc_path and mpp == loc_mpp

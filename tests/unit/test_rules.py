"""Every rule that runs a job asks for resources through `resources_for` (SLURM gets a memory and time
request, never a whole node), and has a conda environment; the rule files hold rules only."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO

RULE = re.compile(r"^(?P<indent> *)(?:local)?rule (?P<name>\w+):\s*$")
JOB_DIRECTIVES = ("script:", "shell:", "run:", "wrapper:")


def _rule_blocks() -> dict[str, tuple[str, str]]:
    """rule name → (file, the rule's text), for rules at any indentation (inside `if` blocks too)."""
    blocks: dict[str, tuple[str, str]] = {}
    for path in sorted((REPO / "rules").glob("*.smk")) + [REPO / "Snakefile"]:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            m = RULE.match(line)
            if not m:
                continue
            indent = len(m["indent"])
            body = []
            for nxt in lines[i + 1 :]:
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                body.append(nxt)
            text = "\n".join(body)
            blocks.setdefault(m["name"], (path.name, ""))
            blocks[m["name"]] = (path.name, blocks[m["name"]][1] + "\n" + text)  # alternatives of one rule
    return blocks


BLOCKS = _rule_blocks()
JOBS = {n: b for n, b in BLOCKS.items() if any(d in b[1] for d in JOB_DIRECTIVES)}


def test_the_parser_sees_the_rules():
    assert {"tile_slide", "register_plism", "hest_store", "probe_demo", "report"} <= set(JOBS)
    assert "all_benchmarks" in BLOCKS and "all_benchmarks" not in JOBS  # a target runs no job


@pytest.mark.parametrize("name", sorted(JOBS))
def test_every_job_rule_declares_resources_and_an_environment(name):
    path, text = JOBS[name]
    if "localrule: True" in text:
        return  # runs inside the Snakemake process (e.g. cache_teacher writes a small manifest)
    assert "resources_for(" in text, f"{path}: rule {name} has no resources: **resources_for({name!r})"
    assert "threads_for(" in text, f"{path}: rule {name} has no threads: threads_for({name!r})"
    assert "conda:" in text, f"{path}: rule {name} has no conda environment"


# ------------------------------------------------------------------------------------ the report's params

_REPORT_PARAMS = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, Quietness, ResourceSettings, StorageSettings

repo, workdir, variants = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
out = []
for overrides in variants:
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(),
            config_settings=ConfigSettings(configfiles=[repo / "config.yaml"], config=overrides),
            storage_settings=StorageSettings(),
            snakefile=repo / "Snakefile",
            workdir=workdir,
        )._workflow
        params = workflow.get_rule("report").params
        out.append({k: v({}) if callable(v) else v for k, v in zip(params.keys(), params, strict=True)})
print(json.dumps(out, default=str))
"""


def test_report_params_hold_only_what_changes_the_report(tmp_path):
    """Editing a setting the report does not show (a SLURM runtime, a distillation setting) leaves rule
    report's params as they were, so Snakemake does not rerun it; a shown setting (seed) changes them."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    shutil.copytree(REPO / "configs", tmp_path / "configs")
    variants = [
        {},
        {
            "resources": {"report": {"runtime_min": 999, "mem_mb": 1234, "cpus": 1}},
            "distill": {"runs": {"demo": {"iterations": 7, "lr": 0.01}}},
        },
        {"seed": 1},
    ]
    code = subprocess.run(
        [sys.executable, "-c", _REPORT_PARAMS, str(REPO), str(tmp_path), json.dumps(variants)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert code.returncode == 0, code.stderr[-3000:]
    base, unshown, seed = json.loads(code.stdout.strip().splitlines()[-1])
    assert (
        base["config"]["seed"] == 0 and "resources" not in base["config"] and "distill" not in base["config"]
    )
    assert unshown == base
    assert seed != base and seed["config"]["seed"] == 1

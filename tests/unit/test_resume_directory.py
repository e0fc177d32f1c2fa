"""The Snakemake behaviour rule `distill_resume` relies on (rules/distill.smk), pinned on a two-rule workflow
of the same shape: a failed job's retry finds the checkpoint in the resume directory (it is not the failed
job's output), a changed input recreates the directory empty, `--delete-all-output` removes it, and files
written into it do not make the job outdated (a directory output's time is its `.snakemake_timestamp`).
Not `ancient()`: with it, Snakemake 9 does not rerun the job after its producer reran."""

from __future__ import annotations

import subprocess
import sys

SNAKEFILE = """
rule resume:
    input: "upstream.txt"
    output: directory("resume")
    shell: "mkdir {output} && echo made > {output}/run.json"

rule train:
    input: up="upstream.txt", resume="resume"
    output: "student.txt"
    retries: 1
    shell:
        '''
        if [ -f {input.resume}/checkpoint ]; then echo resumed > {output}; exit 0; fi
        if [ -f fail_once ]; then rm fail_once; echo 1 > {input.resume}/checkpoint; exit 75; fi
        echo fresh > {output}
        '''
"""


def _snakemake(workdir, *args):
    command = [sys.executable, "-m", "snakemake", "-s", str(workdir / "Snakefile"), "-d", str(workdir)]
    return subprocess.run([*command, "--cores", "1", *args], capture_output=True, text=True, check=True)


def test_a_retry_resumes_an_upstream_change_starts_fresh_and_delete_all_output_removes_it(tmp_path):
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    (tmp_path / "upstream.txt").write_text("tiles v1\n")
    (tmp_path / "fail_once").touch()  # the first attempt is preempted after its checkpoint (exit 75)
    _snakemake(tmp_path, "student.txt")
    assert (tmp_path / "student.txt").read_text() == "resumed\n"  # the retry found the checkpoint

    (tmp_path / "upstream.txt").write_text("tiles v2\n")  # an upstream change: the old checkpoint must go
    _snakemake(tmp_path, "student.txt")
    assert (tmp_path / "student.txt").read_text() == "fresh\n"
    assert sorted(p.name for p in (tmp_path / "resume").glob("[!.]*")) == ["run.json"]

    (tmp_path / "resume" / "checkpoint").write_text("left behind\n")  # written during a run
    assert "Nothing to be done" in _snakemake(tmp_path, "-n", "student.txt").stdout
    _snakemake(tmp_path, "--delete-all-output", "student.txt")
    assert not (tmp_path / "resume").exists() and not (tmp_path / "student.txt").exists()

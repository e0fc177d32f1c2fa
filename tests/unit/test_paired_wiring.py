"""configs/paired.yaml's mask pairing is wired (issue 15): a dry run of the mask run's student plans rule
demo_mask for every demo slide, and the mask run's distill job lists the mask store's files among its
inputs (so the masks are made first, and a changed mask reruns the student); a run of another pairing
lists none."""

from __future__ import annotations

from tests.helpers import overlay_dry_run_jobs


def test_the_mask_run_of_paired_yaml_reads_the_demo_mask_store(tmp_path):
    students = [
        f"results/students/{run}/student.safetensors"
        for run in ("mask-asym-separate", "context-asym-separate")
    ]
    jobs = overlay_dry_run_jobs(tmp_path, "paired.yaml", students)
    masks = [f"results/masks/demo/demo_0{i}.tiff" for i in range(3)]  # configs/demo_samples.tsv's slides
    made = sorted(j["wildcards"] for j in jobs if j["rule"] == "demo_mask")
    assert made == [f"cohort=demo, slide=demo_0{i}" for i in range(3)]
    distill = {j["wildcards"]: j["input"].split(", ") for j in jobs if j["rule"] == "distill"}
    assert set(distill) == {"run=mask-asym-separate", "run=context-asym-separate"}
    assert set(masks) <= set(distill["run=mask-asym-separate"])
    assert not any("results/masks/" in path for path in distill["run=context-asym-separate"])

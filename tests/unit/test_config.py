import pytest

from histodistill.config import load_config, read_sample_sheet, validate_config
from histodistill.errors import ConfigError
from histodistill.slides import parse_mpp


def test_defaults_are_filled_in_nested_sections():
    config = validate_config({"samples": "s.tsv"})
    assert config["tiling"]["mpp"] == 0.5
    assert config["tiling"]["tile_px"] == 224
    assert config["packing"]["chunk_tiles"] == 64
    assert config["demo"]["enabled"] is False


def test_given_values_are_kept():
    config = validate_config({"samples": "s.tsv", "tiling": {"mpp": 1.0}})
    assert config["tiling"]["mpp"] == 1.0
    assert config["tiling"]["tile_px"] == 224


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown config key 'tiling\.tile_size'"):
        validate_config({"samples": "s.tsv", "tiling": {"tile_size": 224}})


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"config key 'tiling\.mpp': 'abc' is not of type 'number'"):
        validate_config({"samples": "s.tsv", "tiling": {"mpp": "abc"}})


def test_out_of_range_and_enum_are_named():
    with pytest.raises(ConfigError, match=r"tiling\.min_tissue"):
        validate_config({"samples": "s.tsv", "tiling": {"min_tissue": 1.5}})
    with pytest.raises(ConfigError, match=r"tiling\.on_no_tissue"):
        validate_config({"samples": "s.tsv", "tiling": {"on_no_tissue": "ignore"}})


def test_missing_required_key():
    with pytest.raises(ConfigError, match="samples"):
        validate_config({})


def test_resources_entries_are_checked():
    validate_config({"samples": "s", "resources": {"tile_slide": {"mem_mb": 100, "gpus": 0}}})
    with pytest.raises(ConfigError, match=r"resources\.tile_slide"):
        validate_config({"samples": "s", "resources": {"tile_slide": {"memory": 100}}})


def test_load_config_from_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("samples: s.tsv\ntiling:\n  tile_px: 256\n")
    assert load_config(path)["tiling"]["tile_px"] == 256
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def _sheet(tmp_path, text):
    path = tmp_path / "samples.tsv"
    path.write_text(text)
    return path


def test_sample_sheet_reads_paths_with_spaces_and_quotes(tmp_path):
    sheet = read_sample_sheet(
        _sheet(
            tmp_path,
            "slide_id\tpath\tcohort\tmpp\na\t/data/my \"odd\" 'dir'/a b.svs\tc1\t0.25\nb\tb.svs\tc1\t\n",
        )
    )
    assert sheet.loc["a", "path"] == "/data/my \"odd\" 'dir'/a b.svs"
    assert sheet.loc["a", "mpp"] == 0.25
    assert sheet.loc["b", "mpp"] != sheet.loc["b", "mpp"]  # NaN: no override


def test_sample_sheet_mpp_is_parsed_by_parse_mpp(tmp_path):
    sheet = read_sample_sheet(
        _sheet(tmp_path, "slide_id\tpath\tcohort\tmpp\na\ta.svs\tc\t 0.5 \nb\tb.svs\tc\t \n")
    )
    assert sheet["mpp"].dtype == "float64" and sheet.loc["a", "mpp"] == 0.5
    assert [parse_mpp(v) for v in sheet["mpp"]] == [0.5, None]
    assert read_sample_sheet(_sheet(tmp_path, "slide_id\tpath\tcohort\na\ta.svs\tc\n"))["mpp"].isna().all()
    with pytest.raises(ConfigError, match=r"'mpp' is not a number > 0 for slide\(s\) \['b'\]"):
        read_sample_sheet(_sheet(tmp_path, "slide_id\tpath\tcohort\tmpp\na\ta.svs\tc\t1\nb\tb.svs\tc\t-1\n"))


def test_sample_sheet_rejects_duplicate_ids(tmp_path):
    with pytest.raises(ConfigError, match=r"duplicate slide_id\(s\) \['a'\]"):
        read_sample_sheet(_sheet(tmp_path, "slide_id\tpath\tcohort\na\tx.svs\tc\na\ty.svs\tc\n"))


def test_sample_sheet_rejects_missing_columns_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="lacks column"):
        read_sample_sheet(_sheet(tmp_path, "slide_id\tpath\na\tx.svs\n"))
    with pytest.raises(ConfigError, match="not a number"):
        read_sample_sheet(_sheet(tmp_path, "slide_id\tpath\tcohort\tmpp\na\tx.svs\tc\tfast\n"))
    with pytest.raises(ConfigError, match=r"\[.a/b.\] are not safe ids"):
        read_sample_sheet(_sheet(tmp_path, "slide_id\tpath\tcohort\na/b\tx.svs\tc\n"))
    with pytest.raises(ConfigError, match="empty 'path'"):
        read_sample_sheet(_sheet(tmp_path, "slide_id\tpath\tcohort\na\t\tc\n"))
    with pytest.raises(ConfigError, match="not found"):
        read_sample_sheet(tmp_path / "missing.tsv")


def test_distill_run_keys_are_exactly_the_trainer_settings():
    """The schema names every DistillConfig field (so an unknown key is caught at load time, by name)."""
    from dataclasses import fields

    from histodistill.config import load_schema
    from histodistill.distill.trainer import DistillConfig

    run = load_schema()["properties"]["distill"]["properties"]["runs"]["additionalProperties"]["properties"]
    assert set(run) - {"cohort"} == {f.name for f in fields(DistillConfig)} - {
        "teacher",
        "teacher_weights",
        "collapse_floor",  # distill.collapse_floor / collapse_patience: one setting for every run
        "collapse_patience",
        "collapse_entropy_ceiling",
    }
    with pytest.raises(ConfigError, match=r"unknown config key 'distill\.runs\.r1\.learning_rate'"):
        validate_config({"samples": "s", "distill": {"runs": {"r1": {"cohort": "c", "learning_rate": 1}}}})


def _slide_sheet(tmp_path, rows):
    path = tmp_path / "samples.tsv"
    path.write_text("slide_id\tpath\tcohort\n" + "".join(f"{s}\t{p}\tc\n" for s, p in rows))
    return read_sample_sheet(path)


def test_a_missing_slide_file_is_an_error_naming_slide_and_path(tmp_path):
    from histodistill.config import check_slide_files

    (tmp_path / "here.tiff").write_bytes(b"")
    sheet = _slide_sheet(tmp_path, [("here", tmp_path / "here.tiff"), ("gone", tmp_path / "gone.svs")])
    with pytest.raises(
        ConfigError, match=rf"1 slide file\(s\).*gone: {tmp_path}/gone.svs.*on_missing_slide: skip"
    ):
        check_slide_files(sheet)
    kept, skipped = check_slide_files(sheet, on_missing="skip")
    assert list(kept["slide_id"]) == ["here"]
    assert skipped == [{"slide_id": "gone", "path": str(tmp_path / "gone.svs")}]


def test_slides_the_workflow_renders_need_not_exist_yet(tmp_path):
    from histodistill.config import check_slide_files

    demo = tmp_path / "demo" / "slides"
    sheet = _slide_sheet(tmp_path, [("d0", demo / "d0.tiff")])
    kept, skipped = check_slide_files(sheet, made_here=demo)
    assert list(kept["slide_id"]) == ["d0"] and skipped == []
    with pytest.raises(ConfigError, match="d0"):
        check_slide_files(sheet, made_here=tmp_path / "elsewhere")


def test_every_target_stops_at_load_on_a_missing_slide(tmp_path):
    """Even `report` alone (once results exist a target could otherwise plan only the report)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    (tmp_path / "samples.tsv").write_text(f"slide_id\tpath\tcohort\ngone\t{tmp_path}/gone.svs\tc\n")
    (tmp_path / "config.yaml").write_text(f"samples: {tmp_path}/samples.tsv\n")
    for target in ("all_tiles", "all_benchmarks"):
        cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n"]
        run = subprocess.run(
            [*cmd, "--configfile", str(tmp_path / "config.yaml"), "--replace-workflow-config", target],
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode != 0
        assert f"gone: {tmp_path}/gone.svs" in run.stdout + run.stderr

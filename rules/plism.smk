# PLISM matched tiles: a tile grid on the reference slide, one elastix registration per other slide, then
# the grid cut from every slide (or the public pre-registered tiles read from HDF5).
import re

if PLISM["enabled"]:

    wildcard_constraints:
        plism_slide="|".join(re.escape(s) for s in PLISM_MOVING) or "^$",

    if config["demo"]["enabled"]:
        PLISM_DEMO = [s for s in PLISM_SLIDES["slide_id"] if plism_path(s).startswith(config["demo"]["plism_dir"] + "/")]

        rule plism_demo:
            output:
                slides=[plism_path(s) for s in PLISM_DEMO],
                truth=f"{config['demo']['plism_dir']}/truth.json",
            params:
                seed=config["seed"],
                width_px=config["demo"]["plism_width_px"],
                height_px=config["demo"]["plism_height_px"],
                scanners=sorted(set(PLISM_SLIDES.loc[PLISM_DEMO, "scanner"])),
                stainings=sorted(set(PLISM_SLIDES.loc[PLISM_DEMO, "staining"])),
            log:
                "logs/plism_demo.log",
            conda:
                "../envs/wsi.yaml"
            threads: threads_for("plism_demo")
            resources:
                **resources_for("plism_demo"),
            script:
                "../workflow_scripts/plism_demo.py"

    if PLISM["source"] == "slides":

        rule plism_grid:
            input:
                slide=plism_path(PLISM["reference"]),
            output:
                table=f"{PLISM_OUT}/grid.parquet",
                qc=f"{PLISM_OUT}/qc/grid.png",
            params:
                tiling={
                    **{k: config["tiling"][k] for k in TILING_KEYS},
                    "mpp": PLISM["mpp"],
                    "tile_px": PLISM["tile_px"],
                    "min_tissue": PLISM["min_tissue"],
                },
                slide_mpp=plism_mpp(PLISM["reference"]),
                qc_max_px=config["tiling"]["qc_max_px"],
            log:
                "logs/plism_grid.log",
            conda:
                "../envs/wsi.yaml"
            threads: threads_for("plism_grid")
            resources:
                **resources_for("plism_grid"),
            script:
                "../workflow_scripts/plism_grid.py"

        rule register_plism:
            input:
                fixed=plism_path(PLISM["reference"]),
                moving=lambda w: plism_path(w.plism_slide),
                grid=f"{PLISM_OUT}/grid.parquet",
            output:
                transform=directory(f"{PLISM_OUT}/transforms/{{plism_slide}}"),
                qc=f"{PLISM_OUT}/qc/{{plism_slide}}.json",
                png=f"{PLISM_OUT}/qc/{{plism_slide}}.png",
            params:
                registration=PLISM["registration"],
                on_failure=PLISM["on_failure"],
                reference=PLISM["reference"],
                slide_mpps=lambda w: [plism_mpp(PLISM["reference"]), plism_mpp(w.plism_slide)],
            log:
                "logs/register_plism/{plism_slide}.log",
            threads: threads_for("register_plism")
            group: group_for("register_plism")
            resources:
                **resources_for("register_plism"),
            conda:
                "../envs/registration.yaml"
            script:
                "../workflow_scripts/register_plism.py"

        rule plism_tiles:
            input:
                grid=f"{PLISM_OUT}/grid.parquet",
                transforms=expand(f"{PLISM_OUT}/transforms/{{s}}", s=PLISM_MOVING),
                qc=expand(f"{PLISM_OUT}/qc/{{s}}.json", s=PLISM_MOVING),
                slides=[plism_path(s) for s in PLISM_SLIDES["slide_id"]],
            output:
                store=directory(f"{PLISM_OUT}/tiles.zarr"),
                table=f"{PLISM_OUT}/tiles.parquet",
                summary=f"{PLISM_OUT}/qc/summary.tsv",
            params:
                settings=PLISM_SETTINGS,
                manifest=PLISM_RECORDS,
                chunk_tiles=PLISM["chunk_tiles"],
                compression_level=config["packing"]["compression_level"],
            log:
                "logs/plism_tiles.log",
            threads: threads_for("plism_tiles")
            resources:
                **resources_for("plism_tiles"),
            conda:
                "../envs/registration.yaml"
            script:
                "../workflow_scripts/plism_tiles.py"

    else:

        rule plism_tiles:
            input:
                h5=[f"{PLISM['h5_dir']}/{s}_to_{PLISM['reference']}.tif.h5" for s in PLISM_SLIDES["slide_id"]],
            output:
                store=directory(f"{PLISM_OUT}/tiles.zarr"),
                table=f"{PLISM_OUT}/tiles.parquet",
            params:
                settings=PLISM_SETTINGS,
                manifest=PLISM_RECORDS,
                h5_dir=PLISM["h5_dir"],
                chunk_tiles=PLISM["chunk_tiles"],
                compression_level=config["packing"]["compression_level"],
            log:
                "logs/plism_tiles.log",
            threads: threads_for("plism_tiles")
            resources:
                **resources_for("plism_tiles"),
            conda:
                "../envs/registration.yaml"
            script:
                "../workflow_scripts/plism_h5.py"


rule all_plism:
    input:
        [f"{PLISM_OUT}/tiles.zarr", f"{PLISM_OUT}/tiles.parquet"] if PLISM["enabled"] else [],
        (
            expand(f"{PLISM_OUT}/qc/{{s}}.png", s=PLISM_MOVING)
            if PLISM["enabled"] and PLISM["source"] == "slides"
            else []
        ),

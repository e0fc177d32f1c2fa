# Tiling: tissue mask + tile grid per slide (tile table + QC image), then one tile store per cohort.


rule tile_slide:
    input:
        slide=lambda w: slide_path(w.slide),
        # tiling.tissue_method: learned reads a local segmenter: new weights re-tile (none by default).
        tissue_weights=config["tiling"]["tissue_weights"] or [],
    output:
        table=f"{RESULTS}/tiles/{{cohort}}/{{slide}}.parquet",
        qc=f"{RESULTS}/qc/{{cohort}}/{{slide}}.png",
    params:
        tiling={k: config["tiling"][k] for k in TILING_KEYS},
        qc_max_px=config["tiling"]["qc_max_px"],
        slide_mpp=lambda w: slide_mpp_override(w.slide),
    log:
        "logs/tile_slide/{cohort}/{slide}.log",
    threads: threads_for("tile_slide")
    group: group_for("tile_slide")
    resources:
        **resources_for("tile_slide"),
    conda:
        "../envs/wsi.yaml"
    script:
        "../workflow_scripts/tile_slide.py"


rule pack_tiles:
    input:
        tables=lambda w: expand(f"{RESULTS}/tiles/{w.cohort}/{{slide}}.parquet", slide=slides_of(w.cohort)),
        slides=lambda w: [slide_path(s) for s in slides_of(w.cohort)],  # the pixels come from here
    output:
        store=directory(f"{RESULTS}/tilestore/{{cohort}}.zarr"),
    params:
        chunk_tiles=config["packing"]["chunk_tiles"],
        compression_level=config["packing"]["compression_level"],
    log:
        "logs/pack_tiles/{cohort}.log",
    threads: threads_for("pack_tiles")
    resources:
        **resources_for("pack_tiles"),
    conda:
        "../envs/wsi.yaml"
    script:
        "../workflow_scripts/pack_tiles.py"


rule all_tiles:
    input:
        expand(f"{RESULTS}/tilestore/{{cohort}}.zarr", cohort=COHORTS),
        [f"{RESULTS}/qc/{row.cohort}/{row.slide_id}.png" for row in SAMPLES.itertuples()],

# The embedded demo: deterministic synthetic slides, made where the sample sheet expects them.
if config["demo"]["enabled"]:

    rule demo_slide:
        output:
            f"{config['demo']['slides_dir']}/{{slide}}.tiff",
        params:
            seed=config["seed"],
            width_px=config["demo"]["width_px"],
            height_px=config["demo"]["height_px"],
            mpp=config["demo"]["mpp"],
        log:
            "logs/demo_slide/{slide}.log",
        threads: threads_for("demo_slide")
        resources:
            **resources_for("demo_slide"),
        conda:
            "../envs/wsi.yaml"
        script:
            "../workflow_scripts/demo_slide.py"

    rule demo:
        input:
            [p for p in SAMPLES["path"] if p.startswith(config["demo"]["slides_dir"] + "/")],

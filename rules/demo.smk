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
            # a slide of a multi-site cohort: its own random staining and scanner (drawn from its seed)
            multisite=lambda w: SLIDE_COHORTS.get(w.slide) in config["demo"]["multisite_cohorts"],
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


# The demo teacher: trained on synthetic slides of its own (never the cohort's, PLISM or mitosis slides),
# written where `models.<teacher.model>.weights` points, which every rule loading the teacher takes as input.
if config["demo"]["enabled"] and config["demo"]["teacher"]["enabled"]:
    DEMO_TEACHER_WEIGHTS = config["models"].get(config["teacher"]["model"], {}).get("weights")
    if not DEMO_TEACHER_WEIGHTS or not DEMO_TEACHER_WEIGHTS.endswith(".safetensors"):
        raise ValueError(
            f"demo.teacher.enabled: set models.{config['teacher']['model']}.weights to the .safetensors file "
            f"the demo teacher is written to (e.g. results/demo/teacher/{config['teacher']['model']}.safetensors)"
        )

    rule demo_teacher:
        output:
            weights=DEMO_TEACHER_WEIGHTS,
            train_log=DEMO_TEACHER_WEIGHTS.removesuffix(".safetensors") + "_train_log.parquet",
            plot=DEMO_TEACHER_WEIGHTS.removesuffix(".safetensors") + "_train.png",
        params:
            model=config["teacher"]["model"],
            seed=config["seed"] if config["demo"]["teacher"]["seed"] is None else config["demo"]["teacher"]["seed"],
            settings={
                **{k: v for k, v in config["demo"]["teacher"].items() if k not in ("enabled", "seed")},
                "width_px": config["demo"]["width_px"],
                "height_px": config["demo"]["height_px"],
                "mpp": config["demo"]["mpp"],
                # Crops at DemoTeacherConfig's tile scale (224 px at 0.5 µm/px, ≥ 50% tissue), not the
                # run's `tiling.*`: the teacher stands in for a pretrained foundation model, which a
                # change of the cohort's tiling must not retrain.
            },
        log:
            "logs/demo_teacher.log",
        threads: threads_for("demo_teacher")
        resources:
            **resources_for("demo_teacher"),
        conda:
            "../envs/torch.yaml"
        script:
            "../workflow_scripts/demo_teacher.py"

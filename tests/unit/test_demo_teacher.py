"""The trained demo teacher: deterministic, loadable through the registry, better than its random init."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from histodistill.demo.slides import DemoSlideConfig, compose_rgb, render_tissue, render_tissue_maps
from histodistill.demo.teacher import (
    CropPairs,
    DemoTeacherConfig,
    read_teacher_metadata,
    render_slides,
    train_demo_teacher,
)
from histodistill.errors import HistodistillError
from histodistill.models import load_model
from histodistill.models.transforms import ModelTransform

MODEL = "h_optimus_0_tiny"
TRAIN = DemoTeacherConfig(
    steps=60, batch_size=16, n_slides=1, width_px=1536, height_px=1152, eval_crops=16, eval_every=20
)


def test_render_tissue_is_its_latent_maps_composed():
    spec = DemoSlideConfig(512, 384)
    maps = render_tissue_maps(spec, seed=3)
    assert np.array_equal(compose_rgb(maps), render_tissue(spec, 3))
    assert maps.tissue.mean() > 0.3 and maps.nuclei[maps.tissue].sum() > 0.9 * maps.nuclei.sum()
    assert (maps.hema[~maps.tissue] == 0).all() and (maps.eosin[~maps.body] == 0).all()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / f"{MODEL}.safetensors"
    log, plot = out.with_name("train_log.parquet"), out.with_name("train.png")
    metrics = train_demo_teacher(out, MODEL, TRAIN, seed=0, train_log=log, plot=plot)
    return out, log, plot, metrics


def test_weights_load_through_the_registry_with_provenance(trained):
    out, log, plot, metrics = trained
    loaded = load_model(MODEL, weights=out)
    random = load_model(MODEL, seed=0)
    assert loaded.weights == str(out) and loaded.weights_digest == metrics["weights_digest"]
    changed = [
        k for k, v in random.model.state_dict().items() if not torch.equal(v, loaded.model.state_dict()[k])
    ]
    assert len(changed) > 20  # every trained tensor moved from the init
    meta = read_teacher_metadata(out)
    assert meta["params"]["seed"] == 0 and meta["params"]["steps"] == 60 and meta["model_id"] == MODEL
    assert meta["init"] == "random-init(seed=0)" and "torch" in meta["versions"]
    frame = pd.read_parquet(log)
    assert frame["step"].tolist() == list(range(61))  # step 0: the random init's held-out metrics
    assert frame.loc[1:, "loss"].notna().all() and frame["eval_probe_accuracy"].notna().sum() == 4
    assert Image.open(plot).size[0] > 500


def _embed(model, views: np.ndarray) -> np.ndarray:
    transform = ModelTransform(model.spec.transform)
    with torch.inference_mode():
        x = torch.stack([transform(v) for v in views])
        return model.model.forward_features(x)[:, 0].numpy()


def test_trained_teacher_learns_tissue_content_and_resists_stain_shifts_better_than_random_init(trained):
    out, _, _, _ = trained
    # Held out from training and from the trainer's own evaluation: another slide, other crops and stains.
    (slide,) = render_slides(TRAIN, ["test-heldout"], seed=5)
    n = 64
    items = [CropPairs([slide], TRAIN, seed=5, stream=7, grid=16)[k] for k in range(n)]
    views = np.stack([i[0] for i in items])  # [n, 2, 224, 224, 3]: two stainings × scanners of each crop
    nuclei = np.repeat([i[1][2] for i in items], 2)  # the generator's nuclear area fraction
    folds = {"groups": np.repeat(np.arange(n), 2), "cv": GroupKFold(4)}  # a crop's renderings in one fold
    scores = {}
    for name, model in (("random", load_model(MODEL, seed=0)), ("trained", load_model(MODEL, weights=out))):
        emb = _embed(model, views.reshape(-1, *views.shape[2:]))
        ridge = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
        unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        scores[name] = {
            "nuclei_r2": r2_score(nuclei, cross_val_predict(ridge, emb, nuclei, **folds)),
            "pair_top1": ((unit[0::2] @ unit[1::2].T).argmax(1) == np.arange(n)).mean(),
        }
    # 60 steps of 16 images (the demo trains 200 of 24): measured R² 0.54 → 0.64, top-1 0.14 → 0.33
    assert scores["trained"]["nuclei_r2"] >= scores["random"]["nuclei_r2"] + 0.05, scores
    assert scores["trained"]["pair_top1"] >= scores["random"]["pair_top1"] + 0.15, scores


def test_same_seed_gives_identical_weights_whatever_the_loader_workers(tmp_path):
    cfg = DemoTeacherConfig(
        steps=2, batch_size=4, n_slides=1, width_px=1024, height_px=768, eval_crops=16, num_workers=0
    )
    train_demo_teacher(tmp_path / "a.safetensors", MODEL, cfg, seed=1)
    train_demo_teacher(
        tmp_path / "b.safetensors", MODEL, DemoTeacherConfig(**{**cfg.__dict__, "num_workers": 1}), seed=1
    )
    train_demo_teacher(tmp_path / "c.safetensors", MODEL, cfg, seed=2)
    a, b, c = (load_file(tmp_path / f"{n}.safetensors") for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_bad_settings_are_errors():
    with pytest.raises(HistodistillError, match="batch_size must be even"):
        DemoTeacherConfig(batch_size=5)
    with pytest.raises(HistodistillError, match="no .* window"):
        render_slides(DemoTeacherConfig(width_px=512, height_px=512, min_tissue=0.99), ["tiny"], seed=0)


def test_schema_keys_are_trainer_settings_with_the_same_defaults():
    from histodistill.config import load_schema

    keys = load_schema()["properties"]["demo"]["properties"]["teacher"]["properties"]
    defaults = DemoTeacherConfig()
    for key, schema in keys.items():
        if key not in ("enabled", "seed"):
            assert schema["default"] == getattr(defaults, key), key

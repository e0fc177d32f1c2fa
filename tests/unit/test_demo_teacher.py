"""The trained demo teacher: deterministic, loadable through the registry, better than its random init."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.model_selection import GroupKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

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
    steps=40, batch_size=16, n_slides=1, width_px=1536, height_px=1152, eval_crops=16, eval_every=20
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
    assert meta["params"]["seed"] == 0 and meta["params"]["steps"] == 40 and meta["model_id"] == MODEL
    assert meta["init"] == "random-init(seed=0)" and "torch" in meta["versions"]
    frame = pd.read_parquet(log)
    assert frame["step"].tolist() == list(range(41))  # step 0: the random init's held-out metrics
    assert frame.loc[1:, "loss"].notna().all() and frame["eval_probe_accuracy"].notna().sum() == 3
    assert Image.open(plot).size[0] > 500


def _embed(model, views: np.ndarray) -> np.ndarray:
    transform = ModelTransform(model.spec.transform)
    with torch.inference_mode():
        x = torch.stack([transform(v) for v in views])
        return model.model.forward_features(x)[:, 0].numpy()


def test_trained_teacher_separates_tissue_classes_and_resists_stain_shifts_better_than_random_init(trained):
    out, _, _, _ = trained
    # Held out from training and from the trainer's own evaluation: another slide, other crops and stains.
    (slide,) = render_slides(TRAIN, ["test-heldout"], seed=5)
    items = [CropPairs([slide], TRAIN, seed=5, stream=7, grid=16)[k] for k in range(48)]
    views = np.stack([i[0] for i in items])  # [48, 2, 224, 224, 3]
    nuclei = np.array([i[1][2] for i in items])
    classes = np.searchsorted(np.quantile(nuclei, [1 / 3, 2 / 3]), nuclei, side="right")
    scores = {}
    for name, model in (("random", load_model(MODEL, seed=0)), ("trained", load_model(MODEL, weights=out))):
        emb = _embed(model, views.reshape(-1, *views.shape[2:]))
        knn = cross_val_score(
            KNeighborsClassifier(5),
            emb,
            np.repeat(classes, 2),
            groups=np.repeat(np.arange(48), 2),  # both stainings of a crop in the same fold
            cv=GroupKFold(4),
        ).mean()
        unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        sim = unit[0::2] @ unit[1::2].T
        scores[name] = {"knn": knn, "pair_top1": (sim.argmax(1) == np.arange(48)).mean()}
    assert scores["trained"]["knn"] >= scores["random"]["knn"] + 0.1, scores
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

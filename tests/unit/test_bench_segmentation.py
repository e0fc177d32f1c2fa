"""EVA segmentation (`histodistill.bench.segmentation`): Dice as EVA/MONAI compute it, the loss, the decoder's
output size for patch-14 and patch-16 grids, and a decoder that learns from informative tokens only."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from histodistill.bench import BenchmarkError
from histodistill.bench.segmentation import (
    SEGMENTATION_TASKS,
    ConvDecoderMS,
    SegmentationConfig,
    SegmentationTask,
    classwise_dice,
    dice_loss,
    mean_dice,
    monai_dice,
    score_task,
    tokens_to_grid,
    train_decoder,
)


def test_dice_by_hand_background_excluded_and_empty_classes_ignored():
    # image 0: class 1 target 4 px, predicted 2 of them + 2 extra → 2·2/(4+4) = 0.5; class 2 absent in
    # target (NaN, though predicted) → image mean 0.5. Image 1: class 1 target 2 px, predicted exactly → 1;
    # class 2 target 2 px, predicted 1 of them only → 2·1/(2+1) = 2/3 → image mean (1 + 2/3)/2 = 5/6.
    target = np.array(
        [
            [[1, 1, 0, 0], [1, 1, 0, 0]],
            [[1, 1, 2, 2], [0, 0, 0, 0]],
        ]
    )
    pred = np.array(
        [
            [[1, 1, 1, 2], [0, 0, 1, 0]],
            [[1, 1, 2, 0], [0, 0, 0, 0]],
        ]
    )
    per_image = monai_dice(pred, target, num_classes=3)
    assert per_image.shape == (2, 2)
    np.testing.assert_allclose(per_image, [[0.5, np.nan], [1.0, 2 / 3]])
    assert mean_dice(per_image) == pytest.approx((0.5 + 5 / 6) / 2)
    # the classwise log (background included): background of image 0: 4 px target, 3 predicted, 1 shared
    # → 2/7; image 1: 4 px target, 5 predicted, 4 shared → 8/9
    classwise = classwise_dice(monai_dice(pred, target, num_classes=3, include_background=True))
    np.testing.assert_allclose(classwise, [(2 / 7 + 8 / 9) / 2, (0.5 + 1) / 2, 2 / 3])


def test_dice_image_without_any_class_is_left_out_and_all_empty_is_zero():
    target = np.zeros((2, 2, 2), int)
    target[0, 0, 0] = 1
    pred = np.ones((2, 2, 2), int)
    per_image = monai_dice(pred, target, num_classes=2)
    np.testing.assert_allclose(per_image, [[2 / 5], [np.nan]])
    assert mean_dice(per_image) == pytest.approx(0.4)  # image 1 has no foreground target: not averaged
    assert mean_dice(monai_dice(pred, np.zeros_like(target), 2)) == 0.0


def test_dice_ignore_index_as_eva():
    # MoNuSAC-like: 3 classes + ignored class 3. Target pixels of the ignored class count for no class; the
    # prediction there counts (a false positive of class 1 here).
    target = np.array([[[1, 1, 3, 3]]])
    pred = np.array([[[1, 0, 1, 2]]])
    per_image = monai_dice(pred, target, num_classes=4, ignore_index=3)
    # class 1: target 2 px, predicted 2 (one right, one on an ignored pixel) → 2·1/4; class 2: no target → NaN
    np.testing.assert_allclose(per_image, [[0.5, np.nan]])
    with pytest.raises(BenchmarkError, match="outside"):
        monai_dice(pred, target + 3, num_classes=4)


def test_dice_loss_by_hand():
    # one pixel per class, logits that softmax to known probabilities
    logits = torch.log(torch.tensor([[[[0.75, 0.5]], [[0.25, 0.5]]]]))  # [1, 2, 1, 2]
    target = torch.tensor([[[0, 1]]])
    # class 0: tp 0.75, Σp 1.25, Σt 1 → 1 − 1.5/2.25; class 1: tp 0.5, Σp 0.75, Σt 1 → 1 − 1/1.75
    expected = ((1 - (1.5 + 1e-5) / (2.25 + 1e-5)) + (1 - (1 + 1e-5) / (1.75 + 1e-5))) / 2
    assert float(dice_loss(logits, target)) == pytest.approx(expected, rel=1e-6)
    # EVA's ignore_index: the ignored pixel gets logits 0 (uniform softmax) and target 0
    ignored = dice_loss(logits, torch.tensor([[[0, 5]]]), ignore_index=5)
    # class 0: tp 0.75 + 0.5, Σp 1.25, Σt 2 → 1 − 2.5/3.25; class 1: tp 0, Σp 0.75, Σt 0 → 1 − 1e-5/(0.75+1e-5)
    expected = ((1 - (2.5 + 1e-5) / (3.25 + 1e-5)) + (1 - 1e-5 / (0.75 + 1e-5))) / 2
    assert float(ignored) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("patch", "grid", "hidden"), [(14, 16, 64), (16, 14, 56)])
def test_decoder_patch14_and_patch16_grids_end_at_the_mask_size(patch, grid, hidden):
    tokens = torch.randn(2, grid * grid, 8)
    decoder = ConvDecoderMS(8, 3)
    assert decoder.layers(tokens_to_grid(tokens)).shape == (2, 3, hidden, hidden)  # 2 × 2× upsampling
    assert decoder(tokens_to_grid(tokens), (224, 224)).shape == (2, 3, 224, 224)
    # token k of the grid is row k // grid, column k % grid (EVA's reshape of the token sequence)
    grid_map = tokens_to_grid(tokens)
    assert torch.equal(grid_map[1, :, 1, 2], tokens[1, grid + 2])
    with pytest.raises(BenchmarkError, match="not a square"):
        tokens_to_grid(torch.randn(1, grid * grid + 4, 8))  # registers left in


def _synthetic(n, rng, informative: bool, grid=8, dim=16):
    """Masks of random blobs on an 8 × 8 patch grid (labels 0/1/2 per patch, upsampled to 32 px); tokens
    that encode each patch's label (plus noise) or pure noise."""
    labels = rng.integers(0, 3, (n, grid, grid))
    masks = labels.repeat(4, axis=1).repeat(4, axis=2).astype(np.uint8)
    codes = rng.normal(size=(3, dim))
    tokens = rng.normal(scale=0.5, size=(n, grid * grid, dim))
    if informative:
        tokens += codes[labels.reshape(n, -1)]
    return tokens.astype(np.float32), masks


def test_decoder_learns_from_informative_tokens_only():
    rng = np.random.default_rng(0)
    task = SegmentationTask(("background", "a", "b"))
    cfg = SegmentationConfig(max_steps=60, batch_size=16, patience=None, threads=1)
    scores = {}
    for informative in (True, False):
        tokens, masks = _synthetic(48, rng, informative)
        splits = np.array(["train"] * 32 + ["val"] * 16)
        rows = score_task("toy", task, tokens, masks, splits, replace(cfg, n_runs=1))
        scores[informative] = rows.query("metric == 'dice'")["value"].item()
    assert scores[True] > 0.85
    assert scores[False] < 0.6
    assert scores[True] > scores[False] + 0.3


def test_training_schedule_seeding_and_selection():
    rng = np.random.default_rng(1)
    tokens, masks = _synthetic(24, rng, True)
    task = SegmentationTask(("background", "a", "b"))
    cfg = SegmentationConfig(max_steps=20, batch_size=8, patience=None, threads=1)
    fit = train_decoder(tokens[:16], masks[:16], tokens[16:], masks[16:], task, cfg)
    # 2 steps per epoch → 10 epochs; EVA's ConstantLR: lr/3 for 5 epochs, then lr
    assert fit.steps == 20 and fit.lrs == pytest.approx([0.002 / 3] * 5 + [0.002] * 5)
    again = train_decoder(tokens[:16], masks[:16], tokens[16:], masks[16:], task, cfg)
    assert fit.best_dice == again.best_dice and fit.best_step == again.best_step
    assert fit.best_step % 2 == 0  # selected after an epoch's validation
    pred = fit.predict(tokens[16:], (32, 32))
    assert mean_dice(monai_dice(pred, masks[16:], 3)) == pytest.approx(fit.best_dice)
    stopped = train_decoder(
        tokens[:16], masks[:16], tokens[16:], masks[16:], task, replace(cfg, max_steps=2000, patience=2)
    )
    assert stopped.steps < 2000


def test_eva_task_settings():
    consep, monusac = SEGMENTATION_TASKS["consep"], SEGMENTATION_TASKS["monusac"]
    assert (len(consep.classes), consep.n_outputs, consep.ignore_index, consep.patience) == (5, 5, None, 200)
    assert (len(monusac.classes), monusac.n_outputs, monusac.ignore_index, monusac.patience) == (6, 5, 5, 100)
    assert (consep.val_split, monusac.val_split) == ("val", "test")
    default = SegmentationConfig()
    assert (default.max_steps, default.batch_size, default.lr, default.n_runs, default.seed) == (
        2000,
        64,
        0.002,
        5,
        42,
    )


def _embedding_store(path, tokens):
    """A finished embedding store (as `embed` writes it) holding the given patch tokens."""
    import zarr

    root = zarr.open_group(path, mode="w", zarr_format=3)
    root.create_array("embeddings", data=np.asarray(tokens, np.float32))
    root.attrs.update({"complete": True, "provenance": {"config_hash": "test"}})
    return path


def test_demo_task_from_mask_slides_then_run(tmp_path):
    """The demo task: tiles of a demo tile store with their mask-store labels; `run` scores it end to end."""
    import pandas as pd

    from histodistill.bench.segmentation import make_demo_segmentation, read_segmentation_store, run
    from histodistill.demo.masks import make_demo_mask_slide
    from histodistill.demo.slides import DemoSlideConfig, make_demo_slide
    from histodistill.masks import mask_path
    from histodistill.provenance import read_parquet
    from histodistill.tilestore import TileStore
    from tests.helpers import make_tile_store

    spec = DemoSlideConfig(1024, 768)
    slides = {}
    for i, seed in enumerate((3, 4)):
        slides[f"d{i}"] = make_demo_slide(tmp_path / f"d{i}.tiff", seed, spec)
        make_demo_mask_slide(mask_path(tmp_path / "masks", "demo", f"d{i}"), seed, spec)
    store = make_tile_store(tmp_path / "tiles", slides)
    n = make_demo_segmentation(
        store, tmp_path / "masks", tmp_path / "seg.zarr", tmp_path / "seg.csv", tiles_per_slide=2
    )
    masks, splits, attrs = read_segmentation_store(tmp_path / "seg.zarr", tmp_path / "seg.csv")
    tiles = TileStore(tmp_path / "seg.zarr").read(0, n)
    assert n == 4 and list(splits) == ["train", "train", "val", "val"] and attrs["classes"][2] == "nucleus"
    grey = tiles.astype(np.float32).mean(-1)
    assert np.median(grey[masks == 2]) < np.median(grey[masks == 1]) - 40  # labels sit on the nuclei

    # patch tokens (16 × 16 grid of 14 px patches) that encode each patch's majority label
    patch_labels = masks.reshape(n, 16, 14, 16, 14).transpose(0, 1, 3, 2, 4).reshape(n, 256, 196)
    majority = np.stack([(patch_labels == k).mean(-1) for k in range(3)], -1)  # [n, 256, 3]
    tokens = np.concatenate([majority, np.zeros((n, 256, 5))], -1)
    emb = _embedding_store(tmp_path / "emb.zarr", tokens)
    settings = {"max_steps": 4, "batch_size": 2, "n_runs": 2, "threads": 1}
    rows = run(
        {"demo": {}},
        [tmp_path / "seg.zarr"],
        [tmp_path / "seg.csv"],
        [emb],
        tmp_path / "out.parquet",
        model="m",
        settings=settings,
    )
    assert set(rows["metric"]) == {"dice", "dice_background", "dice_tissue", "dice_nucleus", "best_step"}
    assert sorted(set(rows["run"])) == [0, 1] and rows["value"].between(0, 4).all()
    frame, meta = read_parquet(tmp_path / "out.parquet", "scores", BenchmarkError)
    pd.testing.assert_frame_equal(
        frame.reset_index(drop=True), rows.reset_index(drop=True), check_dtype=False
    )
    assert meta["summary"][0]["n_runs"] == 2
    with pytest.raises(BenchmarkError, match="patch tokens"):
        run(
            {"demo": {}},
            [tmp_path / "seg.zarr"],
            [tmp_path / "seg.csv"],
            [_embedding_store(tmp_path / "e2.zarr", tokens[:, 0])],
            tmp_path / "x.parquet",
            model="m",
        )


def test_consep_layout_packed_as_eva(tmp_path):
    """CoNSeP's published layout → EVA's 250 px grid patches at 224 px, Train/Test splits, merged classes."""
    from PIL import Image
    from scipy.io import savemat

    from histodistill.bench.segmentation import pack_eva_task, read_segmentation_store

    rng = np.random.default_rng(0)
    for folder, stem in (("Train", "train_1"), ("Test", "test_1")):
        (tmp_path / folder / "Images").mkdir(parents=True)
        (tmp_path / folder / "Labels").mkdir()
        Image.fromarray(rng.integers(0, 255, (500, 520, 3), dtype=np.uint8)).save(
            tmp_path / folder / "Images" / f"{stem}.png"
        )
        type_map = np.zeros((500, 520), np.int32)
        type_map[:250, :250] = 4  # dysplastic epithelial → epithelial (3)
        type_map[:250, 250:500] = 7  # endothelial → spindle-shaped (4)
        type_map[250:, :250] = 2  # inflammatory
        savemat(tmp_path / folder / "Labels" / f"{stem}.mat", {"type_map": type_map, "inst_map": type_map})
    n = pack_eva_task({"eva": "consep", "root": str(tmp_path)}, tmp_path / "c.zarr", tmp_path / "c.csv")
    masks, splits, attrs = read_segmentation_store(tmp_path / "c.zarr", tmp_path / "c.csv")
    assert (
        n == 8 and list(splits) == ["train"] * 4 + ["val"] * 4
    )  # 2 × 2 patches of 250 px (520 px: 2 columns)
    assert (
        masks.shape == (8, 224, 224) and attrs["classes"][3] == "epithelial" and attrs["ignore_index"] is None
    )
    assert [np.unique(m).tolist() for m in masks[:4]] == [[3], [4], [2], [0]]  # grid order: row by row
    with pytest.raises(BenchmarkError, match="needs eva"):
        pack_eva_task({"eva": "bcss", "root": str(tmp_path)}, tmp_path / "x.zarr", tmp_path / "x.csv")


def test_monusac_layout_packed_as_eva(tmp_path):
    """MoNuSAC's published layout → whole images (shorter side 224, centre crop), region names → classes."""
    import tifffile

    from histodistill.bench.segmentation import pack_eva_task, read_segmentation_store

    def annotation(name, box):
        x0, y0, x1, y1 = box
        vertices = "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1)))
        return (
            f'<Annotation><Attributes><Attribute Name="{name}" Id="1"/></Attributes><Regions>'
            f"<Region><Attributes/><Vertices>{vertices}</Vertices></Region></Regions></Annotation>"
        )

    for folder in ("MoNuSAC_images_and_annotations/P1", "MoNuSAC Testing Data and Annotations/P2"):
        (tmp_path / folder).mkdir(parents=True)
        tifffile.imwrite(
            tmp_path / folder / "img.tif", np.full((224, 448, 3), 200, np.uint8), photometric="rgb"
        )
        xml = annotation("Epithelial", (112, 0, 224, 112)) + annotation("Unknown kind", (224, 112, 336, 224))
        (tmp_path / folder / "img.xml").write_text(f"<Annotations>{xml}</Annotations>")
    n = pack_eva_task({"eva": "monusac", "root": str(tmp_path)}, tmp_path / "m.zarr", tmp_path / "m.csv")
    masks, splits, attrs = read_segmentation_store(tmp_path / "m.zarr", tmp_path / "m.csv")
    assert n == 2 and list(splits) == ["train", "test"] and attrs["ignore_index"] == 5
    # 448 × 224 → centre crop of columns 112–335: Epithelial fills the top-left quarter, the unknown region
    # (→ Ambiguous, 5) the bottom-right one
    assert (masks[0, :100, :100] == 1).all() and (masks[0, 125:, 125:] == 5).all()
    assert (masks[0, 125:, :100] == 0).all() and (masks[0, :100, 125:] == 0).all()


def test_demo_task_refuses_a_mask_of_another_slide_size(tmp_path):
    from histodistill.bench.segmentation import make_demo_segmentation
    from histodistill.demo.masks import make_demo_mask_slide
    from histodistill.demo.slides import DemoSlideConfig, make_demo_slide
    from histodistill.masks import mask_path
    from tests.helpers import make_tile_store

    slides = {
        f"d{i}": make_demo_slide(tmp_path / f"d{i}.tiff", i, DemoSlideConfig(512, 384)) for i in range(2)
    }
    for i in range(2):
        make_demo_mask_slide(mask_path(tmp_path / "masks", "demo", f"d{i}"), i, DemoSlideConfig(640, 384))
    store = make_tile_store(tmp_path / "tiles", slides)
    with pytest.raises(BenchmarkError, match="remake the mask"):
        make_demo_segmentation(store, tmp_path / "masks", tmp_path / "s.zarr", tmp_path / "s.csv")

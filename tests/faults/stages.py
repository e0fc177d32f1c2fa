"""The stages under fault injection: each job as its CLI command or the one library call its workflow script
makes, on tiny inputs (`build_inputs`), so that an uninterrupted run takes seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from tests.faults.harness import Stage

TEACHER = "h_optimus_0_tiny"
TILE_PX = 112  # small tiles: a 2048 × 1536 slide at 0.25 µm/px gives 54 grid tiles at 0.5 µm/px
N_STORE = 12  # tiles of the demo store (tests/conftest.py)
CACHE_BATCH, EMBED_BATCH = 1, 2
DISTILL = {
    "iterations": 12,
    "batch_size": 4,
    "n_prototypes": 128,
    "head_hidden": 128,
    "num_workers": 0,
    "checkpoint_every": 2,
    "warmup_epochs": 1,
    "warmup_teacher_temp_epochs": 2,
    "lr": 2e-3,
    "holdout_fraction": 0.2,
}
SCANNERS, STAININGS = ("S1", "S2", "S3", "S4"), ("A", "B")
PLISM_TILES, PLISM_DIM = 1500, 64


def _cli(args: str) -> str:
    return f"from histodistill.cli import main\nsys.exit(main([{args}]))"


STAGES = [
    Stage(
        "tile",
        "import histodistill.cli, histodistill.tiling",
        _cli(
            "'tile', str(INPUTS / 'a.tiff'), '--slide-id', 'a', '--out', str(OUT / 'a.parquet'), "
            f"'--qc', str(OUT / 'a.png'), '--tile-px', '{TILE_PX}', '--min-tissue', '0'"
        ),
        ("a.parquet", "a.png"),
    ),
    Stage(
        "pack",
        "import histodistill.cli, histodistill.tilestore",
        _cli(
            "'pack', str(INPUTS / 'tables' / 'a.parquet'), str(INPUTS / 'tables' / 'b.parquet'), "
            "'--out', str(OUT / 'store.zarr'), '--chunk-tiles', '4'"
        ),
        ("store.zarr",),
    ),
    Stage(
        "register (PLISM)",
        "import histodistill.cli, histodistill.registration",
        _cli(
            "'register', str(INPUTS / 'plism' / 'GMH_S60.tiff'), str(INPUTS / 'plism' / 'GMH_AT2.tiff'), "
            "'--grid', str(INPUTS / 'plism_grid.parquet'), '--out', str(OUT / 'reg'), '--iterations', '100', "
            "'--on-failure', 'exclude'"
        ),
        ("reg/transform", "reg/qc.json", "reg/qc.png"),
    ),
    Stage(
        "cache shard",
        "import torch\nfrom histodistill.teacher_cache import cache_teacher",
        f"cache_teacher({TEACHER!r}, INPUTS / 'demo' / 'store.zarr', OUT / 'shard-0.zarr', views=2, shard=0, "
        f"num_shards=3, batch_size={CACHE_BATCH}, chunk_batches=1, num_workers=0, device='cpu')",
        ("shard-0.zarr",),
        chunk_kills=True,
        chunks=N_STORE // 3 // CACHE_BATCH,
    ),
    Stage(
        "distill",
        "import torch\nfrom histodistill.distill.trainer import main",
        "sys.exit(main([str(INPUTS / 'distill.json'), str(INPUTS / 'demo' / 'store.zarr'), str(INPUTS / 'demo' / 'cache.zarr'), "
        "str(OUT / 'student')]))",
        tuple(
            f"student/{n}"
            for n in (
                "student.safetensors",
                "student_ema.safetensors",
                "train_log.parquet",
                "loss.png",
                "agreement.json",
            )
        ),
    ),
    Stage(
        "embed",
        "import torch\nfrom histodistill.embed import extract_embeddings",
        f"extract_embeddings({TEACHER!r}, INPUTS / 'demo' / 'store.zarr', OUT / 'emb.zarr', batch_size={EMBED_BATCH}, "
        "chunk_batches=1, num_workers=0, device='cpu')",
        ("emb.zarr",),
        chunk_kills=True,
        chunks=N_STORE // EMBED_BATCH,
    ),
    Stage(
        "score PLISM",
        "from histodistill.bench import plism",
        "plism.run(INPUTS / 'plism_emb.zarr', INPUTS / 'plism_tiles.parquet', OUT / 'plism' / 'm.parquet', "
        "model='m', unmatched=True, block_size=256)",
        ("plism/m.parquet",),
    ),
    Stage(
        "score probe",
        "import json, torch\nfrom histodistill.bench import probe",
        "probe.run(json.loads((INPUTS / 'probe_tasks.json').read_text()), [INPUTS / 'probe_emb.zarr'], "
        "OUT / 'probe' / 'm.parquet', model='m', knn_ks=[1, 5], linear={'max_steps': 300, 'seeds': (0, 1)})",
        ("probe/m.parquet",),
    ),
    Stage(
        "report",
        "import torch\nfrom histodistill import report",
        f"report.run([INPUTS / 'scores' / 'plism' / '{TEACHER}.parquet', "
        f"INPUTS / 'scores' / 'probe' / '{TEACHER}.parquet'], [INPUTS / 'emb.zarr'], OUT / 'report', "
        f"benchmarks=['plism', 'probe'], models=[{TEACHER!r}], config={{'seed': 0}}, n_boot=200)",
        ("report/leaderboard.parquet", "report/index.html", "report/figures"),
    ),
]


def build_inputs(root: Path, store: Path, cache: Path) -> Path:
    """Every stage's inputs under `root` (upstream artifacts built in this process, uninterrupted); `store`
    and `cache` are the session's demo tile store (12 tiles) and its teacher cache (tests/conftest.py)."""
    from histodistill.bench import plism, probe
    from histodistill.demo.plism import PlismDemoConfig, make_plism_demo
    from histodistill.demo.slides import DemoSlideConfig, make_demo_slide
    from histodistill.embed import extract_embeddings
    from histodistill.tiling import TilingConfig, tile_slide

    small = DemoSlideConfig(width_px=2048, height_px=1536, mpp=0.25, levels=4)
    tiling = TilingConfig(min_tissue=0.0, tile_px=TILE_PX)
    for slide, seed in (("a", 7), ("b", 8)):
        make_demo_slide(root / f"{slide}.tiff", seed=seed, spec=small)
        tile_slide(root / f"{slide}.tiff", slide, root / "tables" / f"{slide}.parquet", tiling)
    (root / "demo").symlink_to(store.parent)  # the cache names its shards relative to its own folder
    assert cache.parent == store.parent
    (root / "distill.json").write_text(json.dumps(DISTILL))

    spec = PlismDemoConfig(1024, 768, scanners=("S60", "AT2"), stainings=("GMH",))
    make_plism_demo(root / "plism", seed=0, spec=spec)
    grid = TilingConfig(min_tissue=0.2)
    tile_slide(root / "plism" / "GMH_S60.tiff", "GMH_S60", root / "plism_grid.parquet", grid)

    _plism_inputs(root)
    _probe_inputs(root)
    extract_embeddings(TEACHER, store, root / "emb.zarr", batch_size=16, num_workers=0, device="cpu")
    scores = root / "scores"
    plism.run(
        root / "plism_emb.zarr",
        root / "plism_tiles.parquet",
        scores / "plism" / f"{TEACHER}.parquet",
        model=TEACHER,
        unmatched=True,
    )
    tasks = json.loads((root / "probe_tasks.json").read_text())
    probe.run(
        tasks,
        [root / "probe_emb.zarr"],
        scores / "probe" / f"{TEACHER}.parquet",
        model=TEACHER,
        methods=["knn", "logreg"],
        knn_ks=[1, 5],
    )
    return root


def _plism_inputs(root: Path) -> None:
    """A finished embedding store of PLISM-like matched tiles (8 slides: 4 scanners × 2 stainings, each a
    noisy copy of one tissue) and its tile table."""
    rng = np.random.default_rng(20)
    tissue = rng.normal(size=(PLISM_TILES, PLISM_DIM))
    slides = [(f"{st}_{sc}", sc, st) for st in STAININGS for sc in SCANNERS]
    feats = np.concatenate([tissue + 0.8 * rng.normal(size=tissue.shape) for _ in slides]).astype(np.float32)
    n = len(slides) * PLISM_TILES
    side = int(np.ceil(np.sqrt(PLISM_TILES)))
    x0 = np.tile((np.arange(PLISM_TILES) // side) * 224, len(slides))
    y0 = np.tile((np.arange(PLISM_TILES) % side) * 224, len(slides))
    root_group = zarr.open_group(root / "plism_emb.zarr", mode="w", zarr_format=3)
    root_group.create_array("embeddings", data=feats, chunks=(512, PLISM_DIM))
    index = {
        "slide_index": np.repeat(np.arange(len(slides), dtype=np.int32), PLISM_TILES),
        "tile_id": np.tile(np.arange(PLISM_TILES, dtype=np.int64), len(slides)),
        "x0": x0,
        "y0": y0,
        "level": np.zeros(n, np.int32),
        "tissue_frac": np.ones(n, np.float32),
    }
    for name, values in index.items():
        root_group.create_array(name, data=values)
    root_group.attrs.update(
        {
            "complete": True,
            "provenance": {"config_hash": "plism", "slides": [{"slide_id": s[0]} for s in slides]},
        }
    )
    table = pd.DataFrame(slides, columns=["slide_id", "scanner", "staining"])
    table = table.loc[np.repeat(np.arange(len(slides)), PLISM_TILES)].reset_index(drop=True)
    table["tile_index"] = np.tile(np.arange(PLISM_TILES), len(slides))
    table.to_parquet(root / "plism_tiles.parquet")


def _probe_inputs(root: Path) -> None:
    """A finished embedding store of three Gaussian classes and a tile-level task with train/val/test."""
    rng = np.random.default_rng(21)
    k, dim, per_split = 3, 32, (240, 80, 80)
    centers = rng.normal(scale=2.0, size=(k, dim))
    x, y, split = [], [], []
    for name, n in zip(("train", "val", "test"), per_split, strict=True):
        labels = rng.integers(0, k, n)
        x.append(centers[labels] + rng.normal(size=(n, dim)))
        y += [f"c{v}" for v in labels]
        split += [name] * n
    emb = np.concatenate(x).astype(np.float32)
    group = zarr.open_group(root / "probe_emb.zarr", mode="w", zarr_format=3)
    group.create_array("embeddings", data=emb)
    group.attrs.update({"complete": True, "provenance": {"config_hash": "probe"}})
    rows = "\n".join(f"{i},{label},{s}" for i, (label, s) in enumerate(zip(y, split, strict=True)))
    (root / "probe.csv").write_text("tile_index,label,split\n" + rows + "\n")
    tasks = {"blobs": {"dataset": "d", "manifest": str(root / "probe.csv"), "level": "tile"}}
    (root / "probe_tasks.json").write_text(json.dumps(tasks))

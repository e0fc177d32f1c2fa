"""HEST-Benchmark gene-expression regression (Jaume et al. 2024), re-implemented on frozen embeddings.

Protocol, as in mahmoodlab/HEST `src/hest/bench/benchmark.py` + `trainer.py` with `bench_config.yaml`
(`dimreduce: PCA`, `latent_dim: 256`, `normalize: True`, `method: ridge`, `seed: 1`):

- targets: log1p of the raw counts of the task's 50 genes (`var_50genes.json`), rows taken from the AnnData
  by the patch barcodes (HEST's `normalize_adata` only applies `log1p`, despite its docstring);
- per fold, the train samples' spots are pooled, then StandardScaler → PCA(256, random_state=seed) fitted
  on the training spots → Ridge(alpha = 100 / (n_pca_components · n_genes), fit_intercept=False,
  solver='lsqr', max_iter=1000, random_state=seed). HEST computes the denominator as
  `X_train.shape[1] * y_train.shape[1]` *after* PCA, i.e. 256 · 50 in the real setting;
- Pearson r per gene over the pooled test spots; the fold score is the mean over genes; a task's score is
  the mean and the population std (`np.std`, ddof=0) of the fold scores; the benchmark's average is the
  mean over tasks.

Two deliberate differences, both documented where they happen: PCA keeps min(256, n_train, D) components
when a fold is too small for 256 (HEST would fail), and a constant gene (or constant prediction) scores
r = 0 with a warning where scipy's `pearsonr` gives NaN. HEST casts the PCA output to float32 tensors
before the Ridge; we stay in float64 (differences are at round-off level).

Task layout (one directory per task): `patches/*.h5` (`img` [N, 224, 224, 3] uint8, `barcode` [N] or
[N, 1] bytes, `coords` [N, 2]), `adata/*.h5ad` (raw counts), `splits/{train,test}_{i}.csv` (columns
`sample_id`, `patches_path`, `expr_path`, paths relative to the task directory) and `var_50genes.json`.
The .h5ad files are read with h5py (dense or CSR/CSC `X`), so `anndata` is not needed.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from histodistill.atomic import atomic_path
from histodistill.bench import BenchmarkError
from histodistill.bench.registry import (
    Benchmark,
    Figure,
    by_model,
    complete_mean,
    complete_mean_se,
    with_mean_over_tasks,
)
from histodistill.images import as_rgb8

log = logging.getLogger(__name__)

GENE_LIST = "var_50genes.json"
SPLIT_COLUMNS = ("sample_id", "patches_path", "expr_path")
ROW_COLUMNS = ["task", "fold", "gene", "metric", "value"]
MEAN = "mean"  # the `gene` of a fold's mean row, and the `task` of the across-task average


@dataclass(frozen=True)
class HestSample:
    """One sample's spots, in the order of its patch file; `expression` is log1p counts [N, n_genes]."""

    sample_id: str
    barcodes: np.ndarray
    coords: np.ndarray
    expression: np.ndarray
    patches_path: Path | None = None
    expr_path: Path | None = None

    def __len__(self) -> int:
        return len(self.barcodes)


@dataclass(frozen=True)
class HestFold:
    train: tuple[str, ...]
    test: tuple[str, ...]


@dataclass(frozen=True)
class HestTask:
    """A task's genes, samples and folds; embeddings are supplied separately, per sample."""

    name: str
    genes: tuple[str, ...]
    samples: dict[str, HestSample]
    folds: tuple[HestFold, ...]


# ----------------------------------------------------------------------------------------- reading


def _as_str(values) -> np.ndarray:
    """Decode an h5py string array (bytes or str, any shape) into a flat array of Python str."""
    flat = np.asarray(values).reshape(-1)
    return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in flat], dtype=object)


def _attr_str(attrs, key: str, default: str | None = None) -> str | None:
    value = attrs.get(key, default)
    return value.decode("utf-8") if isinstance(value, bytes) else value


def read_patch_index(patches_path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Barcodes (str [N]) and coords ([N, 2]) of a HEST patch file, without reading the images."""
    path = Path(patches_path)
    if not path.is_file():
        raise BenchmarkError(f"patch file {path} does not exist")
    with h5py.File(path, "r") as f:
        key = next((k for k in ("barcode", "barcodes") if k in f), None)
        if key is None or "coords" not in f:
            raise BenchmarkError(f"patch file {path} lacks a `barcode` or `coords` dataset")
        barcodes = _as_str(f[key][()])
        coords = np.asarray(f["coords"][()])
    if len(coords) != len(barcodes):
        raise BenchmarkError(f"patch file {path}: {len(barcodes)} barcodes but {len(coords)} coords")
    return barcodes, coords


def read_patch_images(patches_path: str | Path) -> np.ndarray:
    """The `img` dataset of a HEST patch file as uint8 RGB [N, H, W, 3], for embedding the tiles.

    Any mode is converted by `histodistill.images.as_rgb8` (grey [N, H, W] or [N, H, W, 1], RGBA composited
    on white, 16-bit scaled to 8-bit); an array of another shape raises ImageReadError naming the file.
    """
    with h5py.File(patches_path, "r") as f:
        key = next((k for k in ("img", "imgs", "images") if k in f), None)
        if key is None:
            raise BenchmarkError(f"patch file {patches_path} has no `img` dataset")
        img = f[key][()]
        return as_rgb8(img, f"patch file {patches_path}", has_channels=img.ndim == 4)


def _read_index(f: h5py.File, key: str, path: Path) -> np.ndarray:
    """obs/var names of an .h5ad: the group's `_index` column (AnnData ≥ 0.7) or a legacy record array."""
    if key not in f:
        raise BenchmarkError(f"{path} has no `{key}`: not an AnnData file")
    node = f[key]
    if isinstance(node, h5py.Group):
        name = _attr_str(node.attrs, "_index", "_index")
        if name not in node:
            raise BenchmarkError(f"{path}: `{key}` has no index column `{name}`")
        column = node[name]
        if isinstance(column, h5py.Group):  # nullable-string-array (AnnData ≥ 0.11 with pandas strings)
            if "values" not in column:
                raise BenchmarkError(f"{path}: cannot read the index `{key}/{name}`")
            if "mask" in column and np.asarray(column["mask"][()]).any():
                raise BenchmarkError(f"{path}: the index `{key}/{name}` has missing names")
            column = column["values"]
        return _as_str(column[()])
    names = node.dtype.names or ()
    if not names:
        raise BenchmarkError(f"{path}: cannot read the index of `{key}`")
    return _as_str(node[()]["index" if "index" in names else names[0]])


def _read_columns(f: h5py.File, path: Path, cols: np.ndarray) -> np.ndarray:
    """X[:, cols] as a dense float64 array, for dense, CSR or CSC storage."""
    if "X" not in f:
        raise BenchmarkError(f"{path} has no `X`")
    node = f["X"]
    if isinstance(node, h5py.Dataset):
        order = np.argsort(cols)
        block = node[:, cols[order]]  # h5py needs increasing indices along an axis
        out = np.empty_like(block)
        out[:, order] = block
        return out.astype(np.float64)
    encoding = _attr_str(node.attrs, "encoding-type") or _attr_str(node.attrs, "h5sparse_format", "")
    shape = tuple(int(s) for s in node.attrs.get("shape", node.attrs.get("h5sparse_shape", ())))
    if len(shape) != 2 or not {"data", "indices", "indptr"} <= set(node):
        raise BenchmarkError(f"{path}: `X` is neither a dense array nor a CSR/CSC matrix")
    parts = (node["data"][()], node["indices"][()], node["indptr"][()])
    if encoding in ("csr_matrix", "csr"):
        matrix = sp.csr_matrix(parts, shape=shape)
    elif encoding in ("csc_matrix", "csc"):
        matrix = sp.csc_matrix(parts, shape=shape)
    else:
        raise BenchmarkError(f"{path}: unsupported `X` encoding {encoding!r} (expected csr/csc or dense)")
    return matrix[:, cols].toarray().astype(np.float64)


def read_expression(
    expr_path: str | Path, barcodes: Sequence[str], genes: Sequence[str], sample_id: str = ""
) -> np.ndarray:
    """log1p(raw counts) of `genes`, one row per barcode in `barcodes`' order (HEST's `load_adata`)."""
    path = Path(expr_path)
    if not path.is_file():
        raise BenchmarkError(f"expression file {path} of sample {sample_id!r} does not exist")
    who = f"sample {sample_id!r} ({path})" if sample_id else str(path)
    with h5py.File(path, "r") as f:
        obs = _read_index(f, "obs", path)
        var = _read_index(f, "var", path)
        row_of = _position(obs, f"barcode in {who}")
        col_of = _position(var, f"gene in {who}")
        missing = [g for g in genes if g not in col_of]
        if missing:
            raise BenchmarkError(f"{who}: gene {missing[0]!r} is not in the AnnData ({len(missing)} missing)")
        absent = [b for b in barcodes if b not in row_of]
        if absent:
            raise BenchmarkError(
                f"{who}: patch barcode {absent[0]!r} is not in the AnnData obs ({len(absent)} missing); "
                "the patch file and the AnnData do not belong together"
            )
        counts = _read_columns(f, path, np.array([col_of[g] for g in genes], dtype=np.int64))
    counts = counts[np.array([row_of[b] for b in barcodes], dtype=np.int64)]
    if counts.size and (not np.isfinite(counts).all() or counts.min() < 0):
        raise BenchmarkError(f"{who}: X holds negative or non-finite values; HEST expects raw counts")
    return np.log1p(counts)


def _position(names: np.ndarray, what: str) -> dict[str, int]:
    index = {name: i for i, name in enumerate(names)}
    if len(index) != len(names):
        dup = pd.Index(names)[pd.Index(names).duplicated()][0]
        raise BenchmarkError(f"duplicate {what}: {dup!r}")
    return index


def _split_files(split_dir: Path) -> list[tuple[Path, Path]]:
    found: dict[str, dict[int, Path]] = {"train": {}, "test": {}}
    for p in split_dir.glob("*.csv"):
        m = re.fullmatch(r"(train|test)_(\d+)\.csv", p.name)
        if m:
            found[m[1]][int(m[2])] = p
    folds = sorted(set(found["train"]) | set(found["test"]))
    if not folds:
        raise BenchmarkError(f"{split_dir} has no train_{{i}}.csv / test_{{i}}.csv split files")
    for i in folds:
        for kind in ("train", "test"):
            if i not in found[kind]:
                raise BenchmarkError(f"{split_dir}: fold {i} has no {kind}_{i}.csv")
    if folds != list(range(len(folds))):
        raise BenchmarkError(f"{split_dir}: folds must be numbered 0..{len(folds) - 1}, found {folds}")
    return [(found["train"][i], found["test"][i]) for i in folds]


def _read_split(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, dtype=str)
    missing = [c for c in SPLIT_COLUMNS if c not in df.columns]
    if missing:
        raise BenchmarkError(f"split file {path} lacks column {missing[0]!r} (needs {list(SPLIT_COLUMNS)})")
    if df.empty:
        raise BenchmarkError(f"split file {path} lists no samples")
    return df


def load_task(task_dir: str | Path, gene_list: str = GENE_LIST) -> HestTask:
    """Read a HEST task: genes, folds, and per sample its barcodes, coords and aligned log1p expression."""
    task_dir = Path(task_dir)
    gene_file = task_dir / gene_list
    if not gene_file.is_file():
        raise BenchmarkError(f"task {task_dir.name}: gene list {gene_file} does not exist")
    genes = json.loads(gene_file.read_text()).get("genes")
    if not genes or not all(isinstance(g, str) for g in genes):
        raise BenchmarkError(f"{gene_file} must hold {{'genes': [names...]}}")
    if len(set(genes)) != len(genes):
        raise BenchmarkError(f"{gene_file} lists a gene twice")

    folds: list[HestFold] = []
    paths: dict[str, tuple[str, str]] = {}
    for train_csv, test_csv in _split_files(task_dir / "splits"):
        ids = []
        for csv in (train_csv, test_csv):
            df = _read_split(csv)
            for row in df.itertuples(index=False):
                pair = (row.patches_path, row.expr_path)
                if paths.setdefault(row.sample_id, pair) != pair:
                    raise BenchmarkError(f"{csv}: sample {row.sample_id!r} has other paths in another split")
            ids.append(tuple(df["sample_id"]))
        overlap = set(ids[0]) & set(ids[1])
        if overlap:
            raise BenchmarkError(f"{test_csv}: sample {sorted(overlap)[0]!r} is in both train and test")
        folds.append(HestFold(train=ids[0], test=ids[1]))

    samples = {}
    for sample_id, (patches_rel, expr_rel) in paths.items():
        patches_path, expr_path = task_dir / patches_rel, task_dir / expr_rel
        barcodes, coords = read_patch_index(patches_path)
        expression = read_expression(expr_path, barcodes, genes, sample_id=sample_id)
        samples[sample_id] = HestSample(sample_id, barcodes, coords, expression, patches_path, expr_path)
        log.info("%s/%s: %d spots", task_dir.name, sample_id, len(barcodes))
    return HestTask(task_dir.name, tuple(genes), samples, tuple(folds))


# ----------------------------------------------------------------------------------------- scoring


def fit_predict_ridge(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    latent_dim: int = 256,
    seed: int = 1,
    max_iter: int = 1000,
) -> tuple[np.ndarray, dict]:
    """HEST's regressor: StandardScaler → PCA → Ridge(100 / (components · genes), no intercept, lsqr).

    Returns the test predictions and the settings used (`n_components`, `alpha`).
    """
    x_train = np.asarray(x_train, dtype=np.float64)
    x_test = np.asarray(x_test, dtype=np.float64)
    y_train = np.asarray(y_train, dtype=np.float64)
    n_components = min(latent_dim, x_train.shape[0], x_train.shape[1])
    if n_components < latent_dim:
        log.info(
            "PCA keeps %d components, not %d: only %d training spots × %d features",
            n_components,
            latent_dim,
            *x_train.shape,
        )
    scaler = StandardScaler()
    pca = PCA(n_components=n_components, random_state=seed)
    z_train = pca.fit_transform(scaler.fit_transform(x_train))
    z_test = pca.transform(scaler.transform(x_test))
    alpha = 100.0 / (z_train.shape[1] * y_train.shape[1])
    ridge = Ridge(alpha=alpha, fit_intercept=False, solver="lsqr", max_iter=max_iter, random_state=seed)
    ridge.fit(z_train, y_train)
    return ridge.predict(z_test), {"n_components": n_components, "alpha": alpha}


def pearson_per_gene(
    y_true: np.ndarray, y_pred: np.ndarray, genes: Sequence[str] | None = None
) -> np.ndarray:
    """Pearson r of each column; a constant column (truth or prediction) gives 0 and a warning, not NaN."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.ndim == 1:
        y_true, y_pred = y_true[:, None], y_pred[:, None]
    if y_true.shape != y_pred.shape or len(y_true) < 2:
        raise BenchmarkError(f"Pearson r needs ≥ 2 matching rows, got {y_true.shape} and {y_pred.shape}")
    constant = (np.ptp(y_true, axis=0) == 0) | (np.ptp(y_pred, axis=0) == 0)  # as scipy's check
    tc = y_true - y_true.mean(0)
    pc = y_pred - y_pred.mean(0)
    r = np.zeros(y_true.shape[1])
    ok = ~constant
    denom = np.sqrt((tc[:, ok] ** 2).sum(0) * (pc[:, ok] ** 2).sum(0))
    r[ok] = np.clip((tc[:, ok] * pc[:, ok]).sum(0) / denom, -1.0, 1.0)
    if constant.any():
        names = [genes[i] if genes is not None else str(i) for i in np.flatnonzero(constant)]
        warnings.warn(
            f"Pearson r undefined (constant expression or prediction) for {len(names)} gene(s), "
            f"e.g. {names[0]!r}; scored as r = 0",
            RuntimeWarning,
            stacklevel=2,
        )
    return r


def _stack(task: HestTask, embeddings: Mapping[str, np.ndarray], ids: Sequence[str]):
    xs, ys = [], []
    for sid in ids:
        if sid not in task.samples:
            raise BenchmarkError(f"task {task.name}: fold sample {sid!r} is not among the task's samples")
        if sid not in embeddings:
            raise BenchmarkError(f"task {task.name}: no embeddings given for sample {sid!r}")
        x = np.asarray(embeddings[sid])
        sample = task.samples[sid]
        if x.ndim != 2 or len(x) != len(sample):
            raise BenchmarkError(
                f"task {task.name}: embeddings of sample {sid!r} have shape {x.shape}, "
                f"expected [{len(sample)}, D] (one row per patch barcode)"
            )
        if not np.isfinite(x).all():
            raise BenchmarkError(f"task {task.name}: embeddings of sample {sid!r} hold NaN or inf")
        xs.append(x)
        ys.append(sample.expression)
    dims = {x.shape[1] for x in xs}
    if len(dims) > 1:
        raise BenchmarkError(f"task {task.name}: samples' embeddings differ in width: {sorted(dims)}")
    return np.concatenate(xs), np.concatenate(ys)


def score_task(
    task: HestTask,
    embeddings_by_sample: Mapping[str, np.ndarray],
    latent_dim: int = 256,
    seed: int = 1,
    max_iter: int = 1000,
) -> pd.DataFrame:
    """Score one task: per fold and gene the Pearson r on the pooled test spots, plus each fold's mean.

    `embeddings_by_sample[sample_id]` is [N, D], row i embedding patch i of that sample's patch file.
    Returns tidy rows (task, fold, gene, metric="pearson", value); gene "mean" is the fold's mean.
    """
    rows = []
    for i, fold in enumerate(task.folds):
        x_train, y_train = _stack(task, embeddings_by_sample, fold.train)
        x_test, y_test = _stack(task, embeddings_by_sample, fold.test)
        pred, info = fit_predict_ridge(x_train, y_train, x_test, latent_dim, seed, max_iter)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r = pearson_per_gene(y_test, pred, task.genes)
        for w in caught:
            warnings.warn(f"task {task.name} fold {i}: {w.message}", RuntimeWarning, stacklevel=2)
        rows += [(task.name, i, g, "pearson", float(v)) for g, v in zip(task.genes, r, strict=True)]
        rows.append((task.name, i, MEAN, "pearson", float(r.mean())))
        log.info(
            "%s fold %d: n_train=%d n_test=%d pca=%d alpha=%.3g mean r=%.4f",
            task.name,
            i,
            len(x_train),
            len(x_test),
            info["n_components"],
            info["alpha"],
            r.mean(),
        )
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def summarize(rows: pd.DataFrame) -> pd.DataFrame:
    """Per task the mean and std (ddof=0, as HEST) over folds of the fold means; then the mean over tasks.

    Returns rows (task, metric, value) with metric "pearson_mean" / "pearson_std"; task "mean" is the
    benchmark average (mean over tasks of their pearson_mean).
    """
    fold_means = rows[(rows["gene"] == MEAN) & (rows["metric"] == "pearson")]
    if fold_means.empty:
        raise BenchmarkError("no fold-mean rows (gene == 'mean') to summarise")
    per_task = fold_means.groupby("task", sort=True)["value"].agg(
        pearson_mean="mean", pearson_std=lambda v: float(np.std(v.to_numpy()))
    )
    out = per_task.reset_index().melt(id_vars="task", var_name="metric", value_name="value")
    overall = pd.DataFrame(
        [{"task": MEAN, "metric": "pearson_mean", "value": per_task["pearson_mean"].mean()}]
    )
    return pd.concat([out.sort_values(["task", "metric"]), overall], ignore_index=True)


def run(
    task_dirs: Sequence[str | Path],
    embedding_stores: Sequence[str | Path],
    out: str | Path,
    *,
    model: str,
    latent_dim: int = 256,
    seed: int = 1,
) -> pd.DataFrame:
    """Score one model on every HEST task and write the tidy rows to Parquet `out`, with provenance.

    `task_dirs[i]` is a task directory (layout in the module docstring) and `embedding_stores[i]` the
    model's embedding store of that task's tile store (made by `bench.datasets.pack_hest_task`, one slide
    per sample in the order of the store's provenance). Returns the rows of `score_task` for every task
    (task, fold, gene, metric, value); the provenance holds the settings, each task's embeddings config
    hash and the summary (`summarize`). Raises BenchmarkError when the two lists differ in length or a
    task's layout or embeddings do not fit (see `load_task`, `score_task`).
    """
    from histodistill.bench import write_scores
    from histodistill.bench.datasets import embeddings_by_sample
    from histodistill.embed import EmbeddingStore
    from histodistill.provenance import provenance

    if len(task_dirs) != len(embedding_stores):
        raise BenchmarkError(f"{len(task_dirs)} HEST task(s) but {len(embedding_stores)} embedding store(s)")
    frames, sources, names = [], {}, []
    for task_dir, emb_path in zip(task_dirs, embedding_stores, strict=True):
        task = load_task(task_dir)
        store = EmbeddingStore(emb_path)
        samples = [s["slide_id"] for s in store.attrs["provenance"]["slides"]]
        by_sample = embeddings_by_sample(store.embeddings, store.index()["slide_index"], samples)
        frames.append(score_task(task, by_sample, latent_dim=latent_dim, seed=seed))
        sources[task.name] = store.attrs["provenance"]["config_hash"]
        names.append(task.name)
    rows = pd.concat(frames, ignore_index=True)
    meta = provenance(
        {"tasks": names, "latent_dim": latent_dim, "seed": seed},
        benchmark="hest",
        model=model,
        embeddings_config_hash=sources,
        summary=summarize(rows).to_dict("records"),
    )
    write_scores(rows, out, meta)
    return rows


# ----------------------------------------------------------------------------------------- demo data


def write_h5ad(
    path: str | Path,
    counts: np.ndarray,
    obs_names: Sequence[str],
    var_names: Sequence[str],
    sparse: bool = True,
) -> Path:
    """Write a minimal AnnData file (X, obs/var index; on-disk spec 0.1/0.2) with h5py, atomically."""
    counts = np.asarray(counts)
    if counts.shape != (len(obs_names), len(var_names)):
        raise BenchmarkError(
            f"{path}: counts {counts.shape} do not match {len(obs_names)} obs × {len(var_names)} var"
        )
    text = h5py.string_dtype("utf-8")

    def encode(node, kind: str, version: str) -> None:
        node.attrs["encoding-type"] = kind
        node.attrs["encoding-version"] = version

    def frame(f: h5py.File, key: str, names: Sequence[str]) -> None:
        g = f.create_group(key)
        encode(g, "dataframe", "0.2.0")
        g.attrs["_index"] = "_index"
        g.attrs["column-order"] = np.array([], dtype=text)
        d = g.create_dataset("_index", data=np.array(list(names), dtype=object), dtype=text)
        encode(d, "string-array", "0.2.0")

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        encode(f, "anndata", "0.1.0")
        if sparse:
            m = sp.csr_matrix(counts)
            g = f.create_group("X")
            encode(g, "csr_matrix", "0.1.0")
            g.attrs["shape"] = np.array(counts.shape, dtype=np.int64)
            g.create_dataset("data", data=m.data)
            g.create_dataset("indices", data=m.indices)
            g.create_dataset("indptr", data=m.indptr)
        else:
            encode(f.create_dataset("X", data=counts), "array", "0.2.0")
        frame(f, "obs", obs_names)
        frame(f, "var", var_names)
        for key in ("layers", "obsm", "obsp", "varm", "varp", "uns"):
            encode(f.create_group(key), "dict", "0.1.0")
    return Path(path)


# ----------------------------------------------------------------------------------------------- report


def _summarize_for_report(frame: pd.DataFrame) -> pd.DataFrame:
    """Per task: mean and std (ddof 0, as HEST) over folds of the fold's mean Pearson r, and the folds."""
    rows = summarize(frame)
    rows = rows[rows["task"] != MEAN]
    wide = rows.pivot(index="task", columns="metric", values="value").reset_index()
    folds = frame[frame["gene"] == MEAN].groupby("task")["fold"].nunique()
    wide["n_folds"] = wide["task"].map(folds).astype(int)
    return wide[["task", "pearson_mean", "pearson_std", "n_folds"]]


def _headline(summary: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    return by_model({"hest_pearson_mean": complete_mean(summary, "pearson_mean", models)}, models)


def _errors(summary: pd.DataFrame, models: Sequence[str]) -> pd.DataFrame:
    """The standard error of the headline (mean Pearson r over tasks): per task, that of the mean over its k
    folds, whose test patients are disjoint: std (ddof 0, as HEST reports it) / sqrt(k − 1), i.e. the sample
    std / √k (NaN for one fold); combined over tasks by `complete_mean_se`."""
    k = summary["n_folds"].to_numpy(dtype=float) if len(summary) else np.array([])
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.where(k > 1, summary["pearson_std"].to_numpy(dtype=float) / np.sqrt(k - 1), np.nan)
    frame = summary.assign(pearson_se=se) if len(summary) else summary.assign(pearson_se=[])
    return by_model({"hest_pearson_mean": complete_mean_se(frame, "pearson_se", models)}, models)


def _figures(summary: pd.DataFrame, fig_dir: Path, colors: Mapping[str, str]) -> list[Figure]:
    from histodistill.report import figures

    png = figures.hest_bars(summary, colors)
    figures.write_png(png, fig_dir / "hest_pearson.png")
    caption = "HEST: per task, mean Pearson r over folds (error bars: std over folds)."
    return [Figure(png, "hest_pearson.png", caption)]


def _section(summary: pd.DataFrame, models: Sequence[str], figs: Sequence[Figure]) -> str:
    from histodistill.report import html as page

    if summary.empty:
        return page.note("No HEST scores.")
    models = list(models)  # every model, so one absent from this benchmark shows as a column of "–"
    body = "".join(page.figure(f.png, f.name, f.caption) for f in figs)
    body += page.note(
        "Pearson r between predicted and measured log1p expression, mean over the task's genes per fold; "
        "cells: mean ± std (ddof 0, as HEST) over folds. The last row is the mean over tasks, given only "
        "for a model that has every task."
    )
    body += page.wide_table(
        with_mean_over_tasks(summary, "pearson_mean", models),
        ["task"],
        models,
        lambda r: page.fmt_pm(r["pearson_mean"], r.get("pearson_std")),
    )
    return body


BENCHMARK = Benchmark(
    name="hest",
    title="HEST gene expression",
    order=20,
    columns=frozenset(ROW_COLUMNS),
    summarize=_summarize_for_report,
    headline=_headline,
    errors=_errors,
    figures=_figures,
    section=_section,
    labels={"hest_pearson_mean": "HEST Pearson r (mean over tasks)"},
)

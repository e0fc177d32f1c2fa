"""Splits of the two protocols (Ammeling et al. 2025): data scaling and single-source cross-domain.

Data scaling: one fixed test split of ~20% of the annotations by case (per domain), then 5 Monte-Carlo runs,
each drawing ~20% of the remaining cases as validation; each run keeps the fractions 0.1 / 1 / 10 / 100% of
its training and validation annotations, nested (a smaller fraction is a subset of a larger one) and
stratified by label with at least one annotation per label. The authors split annotations, not cases, and
redraw the test set per seed; the issue asks for a fixed case-level test split, which we do by default
(`split: case`), because annotations of one case in both training and test leak.

`split: annotation_seeded` (`annotation_seeded_splits`) is the authors' protocol instead, as their
`linear_probing.py` (DeepMicroscopy/FoundationModelComparison, commit 2d5352a) draws it: per seed (42 … 46),
`rng = np.random.default_rng(seed)`; the test set is `rng.choice(N, floor(0.2 N))` annotations (any case);
for each training fraction f in turn (in the configured order), `rng.choice(pool, floor(f · |pool|))` draws from the rest (independent
draws, not nested) and `rng.choice(draw, int(0.8 |draw|))` keeps 80% of it to fit on. The same generator
calls give the same rows. The other 20% of the draw is the split's validation set, which the linear probe
does not fit on (`Split.fit_val` False; LoRA validates on it). A fraction whose draw is empty is skipped, as
the authors do; one whose training rows lack a label is skipped with a warning (no classifier can be fitted).
Cross-domain: for each domain, ~20% of its cases are held out (redrawn per run), ~20% of the rest validate,
and the model trained on the remainder is tested on the holdout (diagonal) and on every annotation of each
other domain, giving an N×N matrix per run.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from histodistill.bench import BenchmarkError
from histodistill.bench.mitosis.data import TARGETS

log = logging.getLogger(__name__)

SCALING, CROSS_DOMAIN = "scaling", "cross_domain"
SPLIT_MODES = ("case", "annotation_seeded")
PAPER_SEEDS = (42, 43, 44, 45, 46)  # linear_probing.py's SEEDS
ALL = "all"  # train_domain / test_domain of the scaling protocol (every domain pooled)
FRACTIONS = (0.001, 0.01, 0.1, 1.0)


@dataclass(frozen=True)
class Split:
    """Row positions (int64, into the annotation table) of one run: train, validation and named test sets.

    `tests` maps test domain → rows (`ALL` for the scaling protocol); `fraction` is the share of the run's
    training and validation annotations kept; `train_domain` is `ALL` or the cross-domain source domain;
    `fit_val` says whether the linear probe also fits on the validation rows.
    """

    protocol: str
    run: int
    train: np.ndarray
    val: np.ndarray
    tests: dict[str, np.ndarray]
    fraction: float = 1.0
    train_domain: str = ALL
    fit_val: bool = True  # the linear probe fits on train ∪ val (False: on train only, the authors' protocol)


def _pick_cases(
    cases: np.ndarray, sizes: np.ndarray, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Shuffle cases and take the prefix whose rows come closest to `fraction`: ≥ 1 case, never all."""
    if len(cases) < 2:
        return cases[:0]
    order = rng.permutation(len(cases))
    cumulative = np.cumsum(sizes[order])
    k = int(np.argmin(np.abs(cumulative - fraction * sizes.sum()))) + 1
    return cases[order[: min(max(k, 1), len(cases) - 1)]]


def _case_table(annotations: pd.DataFrame, rows: np.ndarray) -> pd.DataFrame:
    sub = annotations.iloc[rows]
    return sub.groupby(["domain", "case"], sort=True).size().rename("n").reset_index()


def _split_cases(
    annotations: pd.DataFrame, rows: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Rows → (picked, rest), picking ~`fraction` of each domain's rows as whole cases."""
    table = _case_table(annotations, rows)
    picked: list[str] = []
    for _, group in table.groupby("domain", sort=True):
        picked += _pick_cases(group["case"].to_numpy(), group["n"].to_numpy(), fraction, rng).tolist()
    in_pick = annotations["case"].iloc[rows].isin(picked).to_numpy()
    return rows[in_pick], rows[~in_pick]


def _nested_order(targets: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """A random order of each label's rows: prefixes give nested, label-stratified subsamples."""
    return {int(t): rng.permutation(rows[targets[rows] == t]) for t in np.unique(targets[rows])}


def _take(order: dict[int, np.ndarray], fraction: float) -> np.ndarray:
    parts = [o[: max(1, math.ceil(fraction * len(o) - 1e-9))] for o in order.values() if len(o)]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def _require_both_labels(annotations: pd.DataFrame, rows: np.ndarray, what: str) -> None:
    present = set(annotations["target"].to_numpy()[rows].tolist())
    if present != {0, 1}:
        lacking = [label for label, t in TARGETS.items() if t not in present]
        raise BenchmarkError(
            f"{what} has no {lacking[0]} annotation ({len(rows)} rows); more cases (or another seed) needed"
        )


def _rng(seed: int, *keys: int | str) -> np.random.Generator:
    """An independent generator per (seed, keys): adding a run or a domain never shifts the others' draws."""
    words = [int(seed)]
    for k in keys:
        words.append(
            k if isinstance(k, int) else int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "little")
        )
    return np.random.default_rng(words)


def scaling_splits(
    annotations: pd.DataFrame,
    fractions: Sequence[float] = FRACTIONS,
    test_fraction: float = 0.2,
    n_val_splits: int = 5,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> list[Split]:
    """The data-scaling protocol: a fixed case-level test split, Monte-Carlo validation splits, fractions.

    One Split per (run, fraction). Cases never cross train, validation and test; the test split is the
    same for every run and fraction; within a run, a smaller fraction's train/val rows are a subset of a
    larger fraction's (see the module docstring). Each (seed, run) has its own generator, so adding a run
    never changes another. Raises BenchmarkError for fractions outside (0, 1], n_val_splits < 1, no domain
    with two cases, or a test or training split that lacks one of the labels.
    """
    fractions = sorted({float(f) for f in fractions})
    if not fractions or fractions[0] <= 0 or fractions[-1] > 1:
        raise BenchmarkError(f"scaling fractions must lie in (0, 1]; got {fractions}")
    if n_val_splits < 1:
        raise BenchmarkError(f"n_val_splits must be ≥ 1; got {n_val_splits}")
    targets = annotations["target"].to_numpy()
    every = np.arange(len(annotations))
    test, pool = _split_cases(annotations, every, test_fraction, _rng(seed, "test"))
    if not len(test):
        raise BenchmarkError("scaling split: no domain has two cases, so no case can be held out for testing")
    _require_both_labels(annotations, test, "the scaling test split")
    out: list[Split] = []
    for run in range(n_val_splits):
        rng = _rng(seed, "val", run)
        val, train = _split_cases(annotations, pool, val_fraction, rng)
        _require_both_labels(annotations, train, f"scaling run {run}: the training split")
        train_order, val_order = _nested_order(targets, train, rng), _nested_order(targets, val, rng)
        for fraction in fractions:
            out.append(
                Split(
                    SCALING,
                    run,
                    _take(train_order, fraction),
                    _take(val_order, fraction),
                    {ALL: test},
                    fraction,
                )
            )
    return out


def annotation_seeded_splits(
    annotations: pd.DataFrame,
    fractions: Sequence[float] = FRACTIONS,
    test_fraction: float = 0.2,
    seeds: Sequence[int] = PAPER_SEEDS,
    fit_share: float = 0.8,
) -> list[Split]:
    """The authors' data-scaling splits: per seed an annotation-level test draw, then per fraction a draw
    from the rest of which `fit_share` is fitted on (module docstring). One Split per (seed, fraction) kept,
    `run` = the seed's position in `seeds`; test and training rows never share an annotation (they may share
    a case: that is the protocol's leak). Raises BenchmarkError for fractions outside (0, 1], no seeds, or a
    test fraction that leaves no test or no training annotation.
    """
    fractions = [float(f) for f in fractions]
    if not fractions or min(fractions) <= 0 or max(fractions) > 1:
        raise BenchmarkError(f"scaling fractions must lie in (0, 1]; got {fractions}")
    if not len(seeds):
        raise BenchmarkError("annotation_seeded splits need at least one seed")
    n = len(annotations)
    n_test = int(np.floor(n * test_fraction))
    if not 0 < n_test < n:
        raise BenchmarkError(f"test_fraction {test_fraction} of {n} annotations gives {n_test} test rows")
    targets = annotations["target"].to_numpy()
    out: list[Split] = []
    for run, seed in enumerate(seeds):
        rng = np.random.default_rng(int(seed))
        test = rng.choice(n, size=n_test, replace=False)
        pool = np.setdiff1d(np.arange(n), test)
        for fraction in fractions:
            size = int(np.floor(len(pool) * fraction))
            if size <= 0:
                log.warning(
                    "annotation_seeded seed %d: fraction %g draws no annotation; skipped", seed, fraction
                )
                continue
            draw = rng.choice(pool, size=size, replace=False)
            keep = int(fit_share * len(draw))
            train = rng.choice(draw, size=keep, replace=False) if keep > 0 else draw
            val = np.setdiff1d(draw, train)
            if len(set(targets[train].tolist())) < 2:
                log.warning(
                    "annotation_seeded seed %d, fraction %g: the %d training annotations have one label; skipped",
                    seed,
                    fraction,
                    len(train),
                )
                continue
            out.append(
                Split(
                    SCALING,
                    run,
                    np.sort(train).astype(np.int64),
                    val.astype(np.int64),
                    {ALL: np.sort(test).astype(np.int64)},
                    fraction,
                    fit_val=False,
                )
            )
    return out


def cross_domain_splits(
    annotations: pd.DataFrame,
    holdout_fraction: float = 0.2,
    val_fraction: float = 0.2,
    n_runs: int = 5,
    seed: int = 0,
) -> list[Split]:
    """Single-source cross-domain splits: one Split per (run, training domain), tested on every domain.

    The training domain's test set is its case-level holdout; every other domain is tested in full.
    Raises BenchmarkError for fewer than 2 domains, a domain with fewer than 3 cases (holdout, validation,
    training), or a training split that lacks one of the labels.
    """
    domains = sorted(annotations["domain"].unique())
    if len(domains) < 2:
        raise BenchmarkError(f"cross-domain evaluation needs ≥ 2 domains; the annotations have {domains}")
    cases = annotations.groupby("domain")["case"].nunique()
    few = [d for d in domains if cases[d] < 3]
    if few:
        raise BenchmarkError(
            f"domain {few[0]!r} has {cases[few[0]]} case(s); cross-domain evaluation needs ≥ 3 per domain "
            "(holdout, validation, training)"
        )
    domain_of = annotations["domain"].to_numpy()
    out: list[Split] = []
    for run in range(n_runs):
        for domain in domains:
            rng = _rng(seed, "cross", run, domain)
            rows = np.flatnonzero(domain_of == domain)
            holdout, rest = _split_cases(annotations, rows, holdout_fraction, rng)
            val, train = _split_cases(annotations, rest, val_fraction, rng)
            _require_both_labels(annotations, train, f"cross-domain run {run}, domain {domain!r}: training")
            tests = {d: (holdout if d == domain else np.flatnonzero(domain_of == d)) for d in domains}
            out.append(Split(CROSS_DOMAIN, run, train, val, tests, 1.0, domain))
    return out


def _splits_frame(splits: Sequence[Split]) -> pd.DataFrame:
    """Splits as a long table (protocol, run, fraction, train_domain, role, test_domain, row) for Parquet."""
    parts = []
    for s in splits:
        roles = [("train", "", s.train), ("val", "", s.val)] + [("test", d, r) for d, r in s.tests.items()]
        for role, test_domain, rows in roles:
            parts.append(
                pd.DataFrame(
                    {
                        "protocol": s.protocol,
                        "run": s.run,
                        "fraction": s.fraction,
                        "train_domain": s.train_domain,
                        "role": role,
                        "test_domain": test_domain,
                        "fit_val": s.fit_val,
                        "row": np.asarray(rows, np.int64),
                    }
                )
            )
    return pd.concat(parts, ignore_index=True)


def _splits_from_frame(frame: pd.DataFrame) -> list[Split]:
    """The inverse of `_splits_frame` (a split with an empty validation set keeps an empty array)."""
    out = []
    keys = ["protocol", "run", "fraction", "train_domain"]
    for (protocol, run, fraction, train_domain), g in frame.groupby(keys, sort=False):
        rows = {role: g.loc[g["role"] == role, "row"].to_numpy(np.int64) for role in ("train", "val")}
        tests = {
            d: t["row"].to_numpy(np.int64)
            for d, t in g[g["role"] == "test"].groupby("test_domain", sort=False)
        }
        fit_val = bool(g["fit_val"].iloc[0]) if "fit_val" in g.columns else True
        out.append(
            Split(
                protocol, int(run), rows["train"], rows["val"], tests, float(fraction), train_domain, fit_val
            )
        )
    return out

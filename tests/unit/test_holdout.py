"""Held-out tissues (histodistill.holdout): blocks and tables by hand, the two position orders, errors."""

import numpy as np
import pandas as pd
import pytest

from histodistill.errors import ConfigError
from histodistill.holdout import TissueHoldoutConfig, held_out_positions, tile_tissues


def _tiles() -> pd.DataFrame:
    """Two slides of a 3 × 4 grid (x0 = 100·column, y0 = 100·row), each stored in the same shuffled order."""
    ys, xs = np.meshgrid(np.arange(3), np.arange(4), indexing="ij")
    perm = np.random.default_rng(0).permutation(12)
    one = pd.DataFrame({"tile_id": perm, "x0": xs.ravel()[perm] * 100, "y0": ys.ravel()[perm] * 100})
    return pd.concat(
        [one.assign(slide_id="ref"), one.assign(slide_id="other", x0=one.x0 + 7)], ignore_index=True
    )


def test_blocks_cut_the_reference_grid_and_give_both_position_orders():
    tiles = _tiles()
    cfg = TissueHoldoutConfig.parse({"method": "blocks", "blocks": [1, 2], "held_out": ["r0c1"]})
    tissue = tile_tissues(tiles, cfg)
    ref = tiles[tiles.slide_id == "ref"]
    # 2 columns over x0 ∈ [0, 300]: x0 0, 100 → c0; 200, 300 → c1 (300 is the last block's edge)
    assert tissue.tolist() == ["r0c1" if x >= 200 else "r0c0" for x in ref.x0]
    store, scoring = held_out_positions(tiles, cfg)
    assert store.tolist() == np.flatnonzero(ref.x0.to_numpy() >= 200).tolist()
    # scoring positions refer to the (x0, y0) order: columns 2 and 3 are positions 6..11
    assert scoring.tolist() == list(range(6, 12))
    rows = TissueHoldoutConfig.parse({"method": "blocks", "blocks": [3, 1], "held_out": ["r2c0"]})
    assert sorted(ref.y0.to_numpy()[held_out_positions(tiles, rows)[0]]) == [200] * 4


def test_a_tissue_table_and_the_errors_that_name_the_setting(tmp_path):
    tiles = _tiles()
    table = pd.DataFrame({"tile_id": range(12), "tissue": ["liver"] * 6 + ["colon"] * 6})
    table.to_csv(tmp_path / "t.tsv", sep="\t", index=False)
    cfg = TissueHoldoutConfig.parse(
        {"method": "table", "table": str(tmp_path / "t.tsv"), "held_out": ["colon"]}
    )
    store, _ = held_out_positions(tiles, cfg)
    ref_ids = tiles.loc[tiles.slide_id == "ref", "tile_id"].to_numpy()
    assert sorted(ref_ids[store].tolist()) == list(range(6, 12))
    with pytest.raises(ConfigError, match=r"\['lung'\] are not tissues here \(known: \['colon', 'liver'\]\)"):
        held_out_positions(tiles, TissueHoldoutConfig(method="table", table=cfg.table, held_out=("lung",)))
    with pytest.raises(ConfigError, match="holds out every tissue"):
        held_out_positions(
            tiles, TissueHoldoutConfig(method="table", table=cfg.table, held_out=("colon", "liver"))
        )
    table.iloc[:10].to_csv(tmp_path / "short.tsv", sep="\t", index=False)
    with pytest.raises(ConfigError, match=r"lacks 2 tile id\(s\), e.g. \[10, 11\]"):
        tile_tissues(
            tiles, TissueHoldoutConfig(method="table", table=str(tmp_path / "short.tsv"), held_out=("a",))
        )
    with pytest.raises(ConfigError, match="held_out is empty"):
        TissueHoldoutConfig.parse({"method": "blocks"})
    with pytest.raises(ConfigError, match="needs plism.tissue_holdout.table"):
        TissueHoldoutConfig.parse({"method": "table", "held_out": ["a"]})

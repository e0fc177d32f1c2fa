"""Snakemake adapter: a synthetic HEST task from the demo cohort's tiles (rule hest_demo)."""

from histodistill.demo.slides import seed_for
from histodistill.demo.tasks import make_demo_hest
from histodistill.logs import log_to
from histodistill.tilestore import TileStore

log_to(snakemake.log[0])
store = TileStore(snakemake.input.store)
tiles = store.read(0, len(store))  # the demo cohort is small
make_demo_hest(
    snakemake.output[0], tiles, seed=seed_for(f"hest:{snakemake.wildcards.task}", snakemake.params.seed)
)

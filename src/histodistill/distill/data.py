"""Training data for distillation: tiles + the teacher cache → the student's views and the teacher's targets.

The two global views of a step are rebuilt from the parameters stored in the teacher cache (bit for bit
what the teacher saw), so cached targets and student inputs correspond. Local crops (student only) are
drawn from seeds of (seed, slide, tile, view ≥ V, epoch): no RNG state to carry across restarts.
The sampler is a deterministic function of (seed, epoch, rank, world size): resuming at iteration k
replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Sampler

from histodistill.augment import LOCAL, AugmentConfig, draw_views, geometric, photometric, render
from histodistill.distill.pairs import PairingConfig, PairSource
from histodistill.teacher_cache import TeacherCache
from histodistill.tilestore import ProcessLocal, TileStore


def split_rows(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training rows and held-out rows (for measuring teacher–student agreement), fixed by the seed."""
    perm = np.random.default_rng(seed).permutation(n)
    n_hold = max(1, round(n * holdout_fraction)) if holdout_fraction > 0 else 0
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


class EpochSampler(Sampler):
    """Yields (row, epoch) for this rank from `start` (a position in samples), epoch after epoch, forever.

    Each epoch is a seeded permutation of the training rows, dealt round-robin to ranks (like
    DistributedSampler, without padding: an epoch's tail that does not fill every rank is dropped).
    """

    def __init__(self, rows: np.ndarray, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.rows, self.seed, self.rank, self.world, self.start = rows, seed, rank, world_size, start
        self.per_rank = len(rows) // world_size
        if self.per_rank == 0:
            raise ValueError(f"{len(rows)} training tiles cannot feed {world_size} ranks")

    def epoch_rows(self, epoch: int) -> np.ndarray:
        perm = self.rows[np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))]
        return perm[: self.per_rank * self.world][self.rank :: self.world]

    def __iter__(self):
        position = self.start
        while True:
            epoch, i = divmod(position, self.per_rank)
            for row in self.epoch_rows(epoch)[i:]:
                yield int(row), int(epoch)
            position = (epoch + 1) * self.per_rank


class DistillDataset:
    """(row, epoch) → the student's uint8 global views `globals` [2, 3, S, S] and local views `locals`
    [L, 3, s, s] (local crops drawn with `augment`, by default the settings the teacher cache recorded,
    so a cache with HED jitter gives the local crops HED jitter too); cached: the teacher's targets `teacher_cls` [2, Dt] (and `teacher_patch` [2, P, Dt]);
    otherwise the teacher side's views `teacher_globals` [2, 3, S, S] for a teacher run on the fly.

    With a `pairing` (distill.pairs), the student's views (and local crops) are rendered from the row's
    paired image with the cached views' parameters; the teacher side stays the tile itself (the student
    side under `symmetric`).

    `photometric=False` (the trainer's loader): the views are only cropped, flipped and resized here
    (`augment.geometric`, uint8) and each view set comes with the parameters it is to be finished with
    (`globals_params` [2, F], `locals_params` [L, F], `teacher_globals_params` [2, F] float64);
    `finish_views` applies the photometric part batched on the training device, equal to `render` on
    the CPU bit for bit (on a GPU, within a few uint8 levels: augment.photometric). The teacher's tokens
    stay fp16 (`teacher_cls` [2, Dt], `teacher_patch` [2, P, Dt]): converted where they are used."""

    def __init__(
        self,
        tiles: str | Path,
        cache: str | Path,
        n_local: int,
        seed: int,
        cached: bool,
        augment: AugmentConfig | None = None,
        pairing: PairingConfig | None = None,
        photometric: bool = True,
    ):
        self.photometric = photometric
        self.tiles_path, self.cache_path = Path(tiles), Path(cache)
        cache_attrs = TeacherCache(self.cache_path).attrs
        if augment is None:  # the settings the cache's views were drawn with (HED jitter: local crops too)
            augment = AugmentConfig.from_dict(cache_attrs["provenance"]["params"]["augment"])
        self.n_local, self.seed, self.cached, self.augment = n_local, seed, cached, augment
        store = TileStore(self.tiles_path)
        self.slide_ids = [s["slide_id"] for s in store.attrs["slides"]]
        self.slide_index, self.tile_id = store.root["slide_index"][:], store.root["tile_id"][:]
        self.pairing = pairing = pairing or PairingConfig()
        self.pairs = PairSource(pairing, store, seed)
        self.index = {"slide_index": self.slide_index}
        if pairing.source == "mask":
            self.index |= {"x0": store.root["x0"][:], "y0": store.root["y0"][:]}
        self.n_views = int(cache_attrs["views"])
        self.fields = ("params", "cls", "patch") if cached else ("params",)
        self._handles = ProcessLocal(partial(_open_pair, self.tiles_path, self.cache_path))

    def __getitem__(self, item: tuple[int, int]):
        row, epoch = item
        store, cache = self._handles.get()
        tile = store[row]
        entry = cache.get(row, self.fields)  # online mode reads the view parameters only
        pair = 2 * (epoch % max(self.n_views // 2, 1))  # cycle through the cached view pairs
        params = entry["params"][pair : pair + 2]
        if self.pairing.source == "none":
            image, teacher_views, student_params = tile, None, params
        else:  # the student side: the paired image under the cached views' own parameters
            image = self.pairs.student_image(store, self.index, row, tile, epoch)
            student_params = self.pairs.render_params(params)
            teacher_views = None if self.cached else self._render(tile, params)
        globals_ = self._render(image, student_params)
        slide = self.slide_ids[int(self.slide_index[row])]
        if self.n_local:  # view numbers after the cached ones, new every epoch
            first = self.n_views + epoch * self.n_local
            local_params = draw_views(
                self.seed,
                slide,
                int(self.tile_id[row]),
                [LOCAL] * self.n_local,
                tile.shape[:2],
                self.augment,
                first,
            )
            local_params = self.pairs.render_params(local_params)
            locals_ = self._render(image, local_params)
        else:
            local_params = np.zeros((0, len(params[0])))
            locals_ = torch.zeros(0, 3, self.augment.local_px, self.augment.local_px, dtype=torch.uint8)
        out = {"globals": globals_, "locals": locals_, "row": row}
        if not self.photometric:
            out |= {"globals_params": student_params, "locals_params": local_params}
        if not self.cached:  # a teacher run on the fly sees the teacher side (the student side if symmetric)
            teacher_side = teacher_views is None or self.pairing.symmetric
            out["teacher_globals"] = globals_ if teacher_side else teacher_views
            if not self.photometric:
                out["teacher_globals_params"] = student_params if teacher_side else params
        if self.cached:  # fp16 as stored: converting is the consumer's (on its device)
            out["teacher_cls"] = torch.from_numpy(np.ascontiguousarray(entry["cls"][pair : pair + 2]))
            if "patch" in entry:
                out["teacher_patch"] = torch.from_numpy(np.ascontiguousarray(entry["patch"][pair : pair + 2]))
        return out

    def _render(self, image: np.ndarray, params: np.ndarray) -> torch.Tensor:
        """uint8 [V, 3, S, S]: the finished views, or (photometric=False) their geometric part."""
        if self.photometric:
            return torch.stack([render(image, p, self.augment) for p in params])
        return torch.stack([geometric(image, p, self.augment) for p in params])


def finish_views(
    batch: dict, key: str, device: torch.device, augment: AugmentConfig = AugmentConfig()
) -> torch.Tensor:
    """A collated batch's view set `key` ("globals", "locals", "teacher_globals": uint8 [B, V, 3, S, S])
    on `device`, finished: the photometric part (augment.photometric, batched) applied there when the
    loader left it out (`{key}_params` [B, V, F] in the batch), as is otherwise. uint8 [B, V, 3, S, S]."""
    views = batch[key].to(device, non_blocking=True)
    params = batch.get(f"{key}_params")
    if params is None or not views.shape[1]:
        return views
    b, v = views.shape[:2]
    return photometric(views.flatten(0, 1), params.flatten(0, 1), augment).unflatten(0, (b, v))


def _open_pair(tiles: Path, cache: Path) -> tuple[TileStore, TeacherCache]:
    return TileStore(tiles), TeacherCache(cache)

"""Every stage's job, SIGKILLed at seeded random points and rerun, gives the artifacts of an uninterrupted
run; after each kill an output is either absent or complete."""

from __future__ import annotations

import pytest

from tests.faults.harness import inject
from tests.faults.stages import STAGES

pytestmark = pytest.mark.slow
KILLS = 4  # landed kills per stage


@pytest.mark.parametrize("index", range(len(STAGES)), ids=[s.name for s in STAGES])
def test_killed_and_rerun_equals_uninterrupted(index, fault_inputs, fault_results, tmp_path):
    stage = STAGES[index]
    result = inject(stage, fault_inputs, tmp_path, seed=1300 + index, kills=KILLS)
    fault_results.append(result)
    assert result.identical, (
        f"{stage.name}: the rerun after kills differs from the uninterrupted run: {result.detail}"
    )
    assert result.landed >= 2, f"{stage.name}: only {result.landed} kills landed: {result.kills}"

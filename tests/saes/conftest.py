import pytest

import sae_lens_gated.saes.gated_function as gated_function
import sae_lens_gated.saes.gated_sparse as gated_sparse


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # 64-row chunks for d_sae=48 in float64: a batch of 200 becomes 64+64+64+8 rows. The
    # scratch budget is lowered alike, so that a batch is split off the CPU too (float32
    # there: 128+72 rows).
    monkeypatch.setattr(gated_sparse, "CPU_CHUNK_BYTES", 64 * 48 * 8)
    monkeypatch.setattr(gated_function, "SPARSE_CPU_CHUNK_BYTES", 64 * 48 * 8)
    monkeypatch.setattr(gated_sparse, "SCRATCH_BUDGET_BYTES", 64 * 48 * 8)

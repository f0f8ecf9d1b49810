"""training.pipeline.head_cost: the time one exit candidate costs, in blocks (what the candidate search charges)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lraee_core import read_manifest
from lraee_core.assets import EMBEDDED_CHECKPOINTS
from training.pipeline.head_cost import main


@pytest.mark.slow
def test_the_cost_is_the_extra_time_per_candidate_over_a_block(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    main(["--checkpoint", "everyday", "--batch", "2", "--rounds", "3", "--threads", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    manifest = read_manifest(EMBEDDED_CHECKPOINTS["everyday"])
    assert result["candidate_layers"] == sorted(manifest.candidate_layers)
    assert (result["backend"], result["batch"], result["rounds"]) == ("onnxruntime", 2, 3)
    assert result["full_rule_s"] > 0 and result["every_head_s"] > 0
    assert result["block_s"] == pytest.approx(result["full_rule_s"] / manifest.num_layers)
    extra = (result["every_head_s"] - result["full_rule_s"]) / len(result["candidate_layers"])
    assert result["per_candidate_s"] == pytest.approx(extra)
    assert result["head_cost_blocks"] == pytest.approx(extra / result["block_s"])

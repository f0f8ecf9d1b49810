"""The live deploy check: real service, real Prometheus, every dashboard query must return data."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy import check
from lraee_core.assets import DEFAULT_CHECKPOINT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prometheus_binary() -> Path:
    """The prometheus binary, installed through apt-get where missing and possible; the only reason to skip."""
    try:
        return check.find_prometheus()
    except check.PrometheusUnavailable as error:
        pytest.skip(f"no prometheus binary for the live deploy check: {error}")


def test_every_dashboard_query_has_data(prometheus_binary: Path) -> None:
    """``python -m deploy.check`` passes against the default checkpoint (its table is in the captured output): its
    operating points carry promises, so the threshold controllers' panels have data too (an untrained checkpoint's
    points promise nothing and would leave them empty)."""
    status = check.main(["--checkpoint", str(DEFAULT_CHECKPOINT), "--prometheus", str(prometheus_binary)])
    assert status == 0, "deploy.check failed: see its table and messages in the captured output"

"""``lraee-train``'s command line: the subcommands that moved say where they went."""

from __future__ import annotations

import pytest

from training.pipeline.cli import MOVED, main


@pytest.mark.parametrize("name", sorted(MOVED))
def test_a_moved_trainer_says_where_it_went(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([name, "--steps", "3"]) == 2
    assert f"run {MOVED[name]}" in capsys.readouterr().err
    assert MOVED[name].startswith("python -m training.embedded.")

"""Training packs: what is written comes back whole, across parts, and an incomplete or damaged pack is an error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.embedded.captions import ClassCaptions
from training.embedded.pack import INDEX_FILE, EncodedSource, main, read_pack, write_pack

CAPTIONS = [
    ClassCaptions("wn:a", ("apple", "eating apple"), ("fruit",), frozenset({"wn:a", "wn:n13134947"})),
    ClassCaptions("wn:b", ("bus",), (), frozenset({"wn:b"})),
]


def _sources() -> list[EncodedSource]:
    images = [bytes([i]) * (30 + i) for i in range(7)]
    labelled = EncodedSource("cifar10", images, [0, 1, 0, 1, 0, 1, 1], CAPTIONS, None)
    flickr = EncodedSource("flickr8k", [b"x" * 50, b"y" * 5], [0, 1], None, [["a dog runs ."], ["two cats", "cats"]])
    return [labelled, flickr]


def test_a_pack_reads_back_as_written_across_several_parts(tmp_path: Path) -> None:
    meta = {"split": {"seed": 0}, "holdout_csv": "path,label\n"}
    write_pack(_sources(), meta, tmp_path / "pack", part_bytes=100)
    parts = sorted(p.name for p in (tmp_path / "pack").glob("part-*.bin"))
    assert len(parts) > 2 and all((tmp_path / "pack" / p).stat().st_size <= 100 for p in parts)
    pack = read_pack(tmp_path / "pack")
    assert pack.meta == meta
    assert pack.sources == _sources()  # bytes, classes, caption material and human captions alike


def test_a_missing_or_damaged_part_and_a_foreign_index_are_errors(tmp_path: Path) -> None:
    folder = tmp_path / "pack"
    write_pack(_sources(), {}, folder, part_bytes=100)
    with pytest.raises(FileExistsError):
        write_pack(_sources(), {}, folder)
    damaged = folder / "part-001.bin"
    original = damaged.read_bytes()
    damaged.write_bytes(b"z" + original[1:])
    with pytest.raises(ValueError, match="SHA-256"):
        read_pack(folder)
    damaged.unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        read_pack(folder)
    damaged.write_bytes(original)
    index = json.loads((folder / INDEX_FILE).read_text())
    (folder / INDEX_FILE).write_text(json.dumps(index | {"format": "other/1"}))
    with pytest.raises(ValueError, match="format"):
        read_pack(folder)
    with pytest.raises(FileNotFoundError, match="not a training pack"):
        read_pack(tmp_path)


def test_a_sample_pack_takes_the_first_photos_of_every_source_and_the_meta(tmp_path: Path) -> None:
    write_pack(_sources(), {"split": {"seed": 0}}, tmp_path / "pack", part_bytes=100)
    main([str(tmp_path / "pack"), str(tmp_path / "sample"), "--per-source", "1"])
    sample = read_pack(tmp_path / "sample")
    assert sample.meta == {"split": {"seed": 0}}
    assert [(s.name, s.images, s.classes, s.texts) for s in sample.sources] == [
        ("cifar10", [b"\x00" * 30], [0], None),
        ("flickr8k", [b"x" * 50], [0], [["a dog runs ."]]),
    ]
    assert sample.sources[0].captions == CAPTIONS

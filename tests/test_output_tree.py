"""container.OutputTree: the one atomic output (a file or a folder), and the output naming beside it."""

import os

import pytest

from weightpack import FormatError, OutputError
from weightpack.container import OutputTree, move_into_place, output_path, refuse_input_as_output


def test_a_file_appears_only_on_commit(tmp_path):
    target = tmp_path / "out.bin"
    out = OutputTree(target, force=False)
    out.path().write_bytes(b"data")
    assert not target.exists() and out.path().name.startswith(".out.bin.") and out.path().name.endswith(".partial")
    out.commit()
    assert target.read_bytes() == b"data" and os.listdir(tmp_path) == ["out.bin"]
    with pytest.raises(OutputError, match="already exists"):
        OutputTree(target, force=False)
    again = OutputTree(target, force=True)
    again.abort()
    assert os.listdir(tmp_path) == ["out.bin"]


def test_a_folder_replaces_the_old_one_whole(tmp_path):
    target = tmp_path / "tree"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(OutputError, match="not empty"):
        OutputTree(target, force=False, folder=True)
    out = OutputTree(target, force=True, folder=True)
    out.path("a/b.txt").write_text("new")
    with pytest.raises(FormatError, match="listed twice"):
        out.path("a/b.txt")
    out.commit()
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["a", "a/b.txt"]
    assert os.listdir(tmp_path) == ["tree"]
    aborted = OutputTree(target, force=True, folder=True)
    aborted.path("x").write_text("x")
    aborted.abort()
    assert os.listdir(tmp_path) == ["tree"] and (target / "a/b.txt").read_text() == "new"


def test_move_into_place_and_output_naming(tmp_path):
    new = tmp_path / "new"
    new.mkdir()
    (new / "f").write_text("1")
    move_into_place(new, tmp_path / "dst")
    assert (tmp_path / "dst" / "f").read_text() == "1" and not new.exists()
    assert output_path(tmp_path / "file.wpk", "x") == tmp_path / "file.wpk"
    assert output_path(tmp_path / "dst", "x") == tmp_path / "dst" / "x"
    assert output_path(str(tmp_path / "made") + "/", "x", create=True) == tmp_path / "made" / "x"
    with pytest.raises(OutputError, match="no such folder"):
        output_path(str(tmp_path / "nope") + "/", "x")
    (tmp_path / "in").write_text("i")
    os.link(tmp_path / "in", tmp_path / "alias")
    with pytest.raises(OutputError, match="is an input"):
        refuse_input_as_output(tmp_path / "alias", [tmp_path / "in"])

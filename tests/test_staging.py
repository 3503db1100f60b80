"""`staged_folder`: a folder is written whole or not at all."""

import pytest

from keras_vmoe.staging import staged_folder


def test_a_failed_block_leaves_the_old_folder_and_no_staging(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="midway"):
        with staged_folder(target) as staging:
            (staging / "new.txt").write_text("new")
            raise RuntimeError("midway")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    assert sorted(path.name for path in target.iterdir()) == ["old.txt"]


def test_replace_swaps_the_folder_and_replace_false_refuses(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="exists"):
        with staged_folder(target, replace=False) as staging:
            (staging / "new.txt").write_text("new")
    assert sorted(path.name for path in target.iterdir()) == ["old.txt"]
    with staged_folder(target) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(path.name for path in target.iterdir()) == ["new.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # Nothing left aside.


def test_a_file_or_the_working_folder_is_never_written_over(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("keep")
    with pytest.raises(FileExistsError, match="is a file"):
        with staged_folder(tmp_path / "file"):
            pass
    (tmp_path / "work" / "inner").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work" / "inner")
    for target in (".", "..", tmp_path / "work"):
        with pytest.raises(FileExistsError, match="holds the working folder"):
            with staged_folder(target):
                pass
    assert (tmp_path / "file").read_text() == "keep" and (tmp_path / "work" / "inner").is_dir()

"""Writing a folder all at once: nothing half-written is ever left at its path.

with staged_folder(target) as staging:
    model.save_to_preset(str(staging))   # anything that writes files
# Here `target` holds the finished folder; after an error, nothing changed.
"""

import contextlib
import pathlib
import shutil
import tempfile


@contextlib.contextmanager
def staged_folder(target, replace=True):
    """Yields a new empty folder beside `target`, which becomes `target` when
    the block ends without an error, and is deleted otherwise.

    An existing `target` folder is replaced when `replace` (it is moved
    aside first and put back if the swap fails), and is an error otherwise
    (`FileExistsError`), as are an existing file and a folder that holds the
    working folder.

    >>> import os, tempfile
    >>> target = os.path.join(tempfile.mkdtemp(), "out")
    >>> with staged_folder(target) as staging:
    ...     _ = (staging / "a.txt").write_text("done")
    >>> sorted(os.listdir(target))
    ['a.txt']
    """
    target = pathlib.Path(target).resolve()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file, not a folder")
    cwd = pathlib.Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise FileExistsError(f"{target} holds the working folder; it cannot be written over")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        if not target.exists():
            staging.rename(target)
            return
        if not replace:
            raise FileExistsError(f"{target} exists")
        aside = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
        target.rename(aside / "old")
        try:
            staging.rename(target)
        except BaseException:
            (aside / "old").rename(target)
            raise
        finally:
            shutil.rmtree(aside)
    finally:
        if staging.exists():
            shutil.rmtree(staging)

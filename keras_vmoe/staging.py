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
    the block ends without an error (replacing an older `target` when
    `replace`), and is deleted otherwise.

    >>> import os, tempfile
    >>> target = os.path.join(tempfile.mkdtemp(), "out")
    >>> with staged_folder(target) as staging:
    ...     _ = (staging / "a.txt").write_text("done")
    >>> sorted(os.listdir(target))
    ['a.txt']
    """
    target = pathlib.Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            if not replace:
                raise FileExistsError(f"{target} exists")
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)

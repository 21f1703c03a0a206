"""File modes of what dskd writes: every file and folder as the umask allows, like any new file.

Most writers (``open``, ``torch.save``, DeepSpeed, TensorBoard) already create files with
``0o666 & ~umask``; safetensors' ``save_file`` creates its file ``0o600``, unreadable to
colleagues on a shared file system. Folders holding such files pass through ``follow_umask``.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return umask


def follow_umask(root: Path) -> None:
    """``root`` and everything under it: files ``0o666 & ~umask``, folders ``0o777 & ~umask``
    (execute bits a file already has are kept)."""
    umask = current_umask()
    for path in [root, *Path(root).rglob("*")]:
        if path.is_symlink():
            continue
        try:
            if path.is_dir():
                mode = 0o777
            else:
                mode = 0o666 | (path.stat().st_mode & 0o111)
            os.chmod(path, mode & ~umask)
        except OSError:  # another user's file left in the folder, or a file system without modes
            pass

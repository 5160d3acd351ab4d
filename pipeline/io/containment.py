"""What a checkpoint may name: files inside itself, regular, of bounded size.

A checkpoint is untrusted input, and an output is published: a name in its index, an asset
that is a symbolic link, or a device standing in for config.json must never make the job read
(and then upload) a file from outside the checkpoint, or read without end. Every file name a
source gives (index entries, assets, config, the loader's own outputs) passes ``check_name``;
a local one then resolves, symbolic links followed, inside the checkpoint directory
(``local_file``), with one exception: a Hugging Face cache snapshot, which is nothing but links
into its repository's ``blobs`` directory. Object stores have no links and no special files;
their names are checked all the same, as ``..`` means something to some of them.
"""

from __future__ import annotations

import os
import stat

# Config, index, tokenizer and other files read whole into memory. The largest real ones are
# tokenizers of about 35 MB (Gemma 3's tokenizer.json) and indexes of about 10 MB (DeepSeek-V3's).
MAX_SMALL_FILE_BYTES = 64 * 1024 * 1024


class ContainmentError(ValueError):
    """A name or file the checkpoint gives leads outside it, or is no regular file of bounded size."""


def check_name(spec: str, name: object) -> str:
    """``name`` as given when it is a relative path that stays inside the checkpoint: no absolute
    path, no ``..`` or empty component, no backslash or NUL."""
    if not isinstance(name, str) or not name:
        raise ContainmentError(f"{spec}: file name {name!r} is not a non-empty string")
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or "\0" in name or any(p in ("", ".", "..") for p in parts):
        raise ContainmentError(f"{spec}: file name {name!r} leads outside the checkpoint; only names inside it "
                               "are read")
    return name


def _allowed_roots(root: str) -> list[str]:
    """The checkpoint directory, and for a Hugging Face cache snapshot (``<repo>/snapshots/<commit>``)
    its repository's ``blobs`` directory, where the snapshot's links point."""
    roots = [root]
    parent = os.path.dirname(root)
    if os.path.basename(parent) == "snapshots":
        blobs = os.path.join(os.path.dirname(parent), "blobs")
        if os.path.isdir(blobs):
            roots.append(blobs)
    return roots


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def local_file(spec: str, root: str, name: str) -> tuple[str, int]:
    """The real path and size of ``name`` in the local checkpoint directory ``root``: it must
    resolve inside the checkpoint and be a regular file (not a FIFO, device or directory).
    Raises ``FileNotFoundError`` when it does not exist."""
    check_name(spec, name)
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, name))
    if not any(_inside(path, r) for r in _allowed_roots(real_root)):
        raise ContainmentError(f"{spec}/{name} is a link to a file outside the checkpoint ({path}); copy the file "
                               "into the checkpoint instead")
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket or other special file")
        raise ContainmentError(f"{spec}/{name} is {kind}, not a regular file")
    return path, st.st_size


def check_size(spec: str, name: str, size: int, cap: int = MAX_SMALL_FILE_BYTES) -> None:
    """Refuse a file read whole into memory that is larger than ``cap``."""
    if size > cap:
        raise ContainmentError(f"{spec}/{name} has {size} bytes, over the {cap // 2**20} MiB cap for a config, index "
                               "or tokenizer file")


def read_local(spec: str, root: str, name: str, cap: int = MAX_SMALL_FILE_BYTES) -> bytes:
    """The bytes of a small local file, checked by ``local_file`` and ``check_size``, read no
    further than ``cap`` whatever the file claims."""
    path, size = local_file(spec, root, name)
    check_size(spec, name, size, cap)
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    check_size(spec, name, len(data), cap)
    return data

"""Reading and writing the project's files safely: one sha256, one atomic write, one weights-only torch.load.

Every file the project writes goes through `atomic_write` (a temporary file in the same folder, then a rename), so
a crash or a kill never leaves half a file that a later run would read; every `.pt` it reads goes through
`load_torch_file` (`torch.load(weights_only=True)`: tensors, containers, numbers and strings only, so a planted
file cannot run code). Errors name the file.
Deliberately not here: what the files hold (run folders: runs.py; caches and splits: data.py; CLIP weights:
clip_load.py), and torchrun's rule that only rank 0 writes (runs.py).
"""
import hashlib
import json
import os
import pickle
import re

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, fetched or read (as a CLIP ViT, or as a run's or cache's file); the message
    names the file."""


def sha256_file(path):
    """The sha256 of a file's bytes, as 64 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path, write):
    """write(tmp) fills a temporary file beside `path`, which then replaces `path` in one rename: readers see the
    old file or the new one, never half of one. The temporary file is removed when `write` fails."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj, indent=None):
    """obj as JSON, atomically (values JSON cannot hold, such as paths, become strings); folders are made."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, default=str)
            if indent is not None:
                f.write("\n")
    atomic_write(path, write)


def save_torch(obj, path):
    """torch.save, atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_torch_file(path, map_location="cpu", expected="a file written by torch.save", refused=None):
    """torch.load(path, weights_only=True): tensors, dicts, lists, tuples, numbers and strings only, so the file
    cannot run code. Every file the project reads with torch.load goes through here (CLIP state dicts, run
    checkpoints, resume files, caches); any failure is a CheckpointError that names the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:  # weights_only refused an object that is not a tensor or a container
            raise CheckpointError(f"{path}: torch.load(weights_only=True) refused it (it holds the global {found[1]}), "
                                  f"which could run code when loaded; {refused or 'expected ' + expected}") from e
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
        raise CheckpointError(f"{path}: not a readable torch.save file, truncated or corrupt? "
                              f"({(detail[1] if detail else str(e)).strip()}); expected {expected}") from e
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found; expected {expected}") from None
    except Exception as e:  # truncated zip, not a pickle at all, ...
        raise CheckpointError(f"{path}: not a readable torch.save file, truncated or corrupt? "
                              f"({type(e).__name__}: {e}); expected {expected}") from e

"""An .npz written while the frames arrive, so a long file never has to fit in memory.

Each array grows in its own temporary file next to the output (raw rows, appended as they come);
close() writes the .npz (an uncompressed zip of .npy files, as numpy.savez writes it, readable by
numpy.load) by copying those files in, then renames it into place. Floating-point arrays are
stored in the chosen dtype (float32 or float16); others as they are.
"""
from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

COPY_CHUNK = 1 << 22  # bytes per read when copying a part into the zip


class NpzStream:
    def __init__(self, path: str | Path, float_dtype: str = "float32"):
        self.path = Path(path)
        self.float_dtype = np.dtype(float_dtype)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        self._parts: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}  # name -> (dtype, row shape, rows)
        self._files: dict[str, object] = {}

    def append(self, name: str, rows: np.ndarray) -> None:
        """Add rows (first axis) to the array `name`; every call's rows must have the same shape."""
        a = np.asarray(rows)
        if a.dtype.kind == "f":
            a = a.astype(self.float_dtype, copy=False)
        known = self._parts.get(name)
        if known is None:
            self._files[name] = open(self._dir / f"{len(self._files)}.bin", "wb")
            known = (a.dtype, a.shape[1:], 0)
        elif (a.dtype, a.shape[1:]) != known[:2]:
            raise ValueError(f"{name}: rows of {a.dtype} {a.shape[1:]} after rows of {known[0]} {known[1]}")
        self._files[name].write(np.ascontiguousarray(a).tobytes())
        self._parts[name] = (known[0], known[1], known[2] + a.shape[0])

    @property
    def bytes_written(self) -> int:
        return sum(dt.itemsize * int(np.prod(shape, dtype=np.int64)) * n for dt, shape, n in self._parts.values())

    def close(self, extra: dict[str, np.ndarray] | None = None) -> Path:
        """Write the .npz with every array appended so far and `extra` (small arrays), atomically."""
        for f in self._files.values():
            f.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for i, (name, (dtype, shape, n)) in enumerate(self._parts.items()):
                    with zf.open(name + ".npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array_header_2_0(member, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                                      "fortran_order": False, "shape": (n, *shape)})
                        with open(self._dir / f"{i}.bin", "rb") as part:
                            shutil.copyfileobj(part, member, COPY_CHUNK)
                for name, array in (extra or {}).items():
                    with zf.open(name + ".npy", "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
            tmp.replace(self.path)
        finally:
            tmp.unlink(missing_ok=True)
            shutil.rmtree(self._dir, ignore_errors=True)
        return self.path

    def discard(self) -> None:
        for f in self._files.values():
            f.close()
        shutil.rmtree(self._dir, ignore_errors=True)

"""Unpack .gpu/pack.py's .npz into the image-folder layout."""
import sys
from pathlib import Path
import numpy as np

packed, root = np.load(sys.argv[1]), Path(sys.argv[2])
blob, offsets = packed["blob"], packed["offsets"]
paths = packed["paths"].tobytes().decode().split("\n")
for i, rel in enumerate(paths):
    path = root / str(rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob[offsets[i]:offsets[i + 1]].tobytes())
print(f"unpacked {len(paths)} files into {root}")

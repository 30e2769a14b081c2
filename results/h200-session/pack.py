"""Pack an image folder's files into one .npz (bytes unchanged), small enough to travel to the GPU machine."""
import sys
from pathlib import Path
import numpy as np

root, out = Path(sys.argv[1]), sys.argv[2]
files = sorted(p for p in root.rglob("*.jpg"))
data = [p.read_bytes() for p in files]
offsets = np.cumsum([0] + [len(d) for d in data])
np.savez(out, blob=np.frombuffer(b"".join(data), np.uint8), offsets=offsets,
         paths=np.frombuffer("\n".join(str(p.relative_to(root)) for p in files).encode(), np.uint8))
print(len(files), offsets[-1])

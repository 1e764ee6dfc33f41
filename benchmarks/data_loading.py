"""How fast a big image folder starts training: list it lazily, then draw the first batches.

    python benchmarks/data_loading.py --make 1000000 /tmp/million   # EDM layout, hard links to 20 PNGs
    python benchmarks/data_loading.py /tmp/million --workers 2

Prints the listing time, the first and next ten batches' times and the peak RSS (docs/results.md).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path


def make_folder(root: Path, count: int, per_dir: int = 1000) -> None:
    """`count` 32x32 PNGs as `00000/img00000000.png`: hard links to 20 files (a file takes at most
    ~65,000 links), so a million images cost seconds and no disk."""
    import numpy as np
    from PIL import Image

    sources = []
    for k in range(20):
        src = root.with_name(f"{root.name}-src{k}.png")
        Image.fromarray((np.random.default_rng(k).random((32, 32, 3)) * 255).astype(np.uint8)).save(src)
        sources.append(src)
    for i in range(count):
        sub = root / f"{i // per_dir:05d}"
        if i % per_dir == 0:
            sub.mkdir(parents=True, exist_ok=True)
        os.link(sources[(i // 60_000) % 20], sub / f"img{i:08d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--make", type=int, default=0, help="first create a folder of this many images")
    args = parser.parse_args()
    if args.make:
        start = time.perf_counter()
        make_folder(args.folder, args.make)
        print(f"made {args.make} images in {time.perf_counter() - start:.1f}s")

    from fewstep.data import load_dataset, make_loader

    start = time.perf_counter()
    dataset = load_dataset(args.folder)
    listed = time.perf_counter() - start
    start = time.perf_counter()
    batches = iter(make_loader(dataset, args.batch_size, workers=args.workers))
    next(batches)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(10):
        next(batches)
    ten = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"images={len(dataset)} shape={dataset.shape} list={listed:.2f}s first_batch={first:.2f}s "
          f"next10={ten:.2f}s peak_rss={rss:.0f}MB")


if __name__ == "__main__":
    main()

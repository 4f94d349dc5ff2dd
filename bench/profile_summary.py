"""Summarise py-spy's collapsed stacks (`make bench ARGS=--profile=FILE`): where time goes.

Only the event loop's thread counts; idle worker threads would drown everything else.
"""

from __future__ import annotations

import sys
from collections import Counter


def main(path: str, top: int = 40) -> None:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            if not any("Runner.run" in frame for frame in frames):
                continue  # not the event loop's thread
            n = int(count)
            total += n
            own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
    print(f"{total} samples on the event loop thread\n\nself time:")
    for frame, n in own.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {frame[:120]}")
    print("\ninclusive time:")
    for frame, n in inclusive.most_common(top * 2):
        print(f"  {100 * n / total:5.1f}%  {frame[:120]}")


if __name__ == "__main__":
    main(sys.argv[1])

"""Summarize a py-spy raw profile (`py-spy record -f raw`): top self and inclusive costs.

    python bench/pyspy_top.py profile.raw [--top 25] [--lines] [--match portao/]

Frames are counted per function (`--lines`: per source line). Percentages are of
all samples taken (py-spy skips idle threads by default), so they read as shares
of the process's busy time. A C call (a socket write, the event loop's own work,
a garbage collection) is charged to the Python line that made it.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

_LINE = re.compile(r":\d+\)$")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--lines", action="store_true", help="count per line, not function")
    parser.add_argument("--match", default="", help="inclusive: only frames containing this")
    args = parser.parse_args()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    with open(args.profile) as lines:
        for line in lines:
            stack, _, count = line.rstrip().rpartition(" ")
            samples = int(count)
            total += samples
            frames = stack.split(";")
            if not args.lines:
                frames = [_LINE.sub(")", frame) for frame in frames]
            own[frames[-1]] += samples
            inclusive.update({frame: samples for frame in set(frames) if args.match in frame})
    print(f"{total} samples")
    for title, counter in (("self", own), ("inclusive", inclusive)):
        print(f"\n{title}:")
        for frame, samples in counter.most_common(args.top):
            print(f"{100 * samples / total:5.1f}%  {frame}")


if __name__ == "__main__":
    main()

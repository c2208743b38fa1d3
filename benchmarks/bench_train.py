"""Training from the cache vs online, and streamed vs in-RAM cache: `mad bench train` as a script.

    python benchmarks/bench_train.py                      # k2 train split, ViT-B-16 bf16, random weights
    python benchmarks/bench_train.py --limit 8 --out benchmarks/results

Takes the same options as `mad bench train` (see --help); the code is in mad/bench/train.py.
"""

import sys

from mad.cli import main

if __name__ == "__main__":
    main(["bench", "train", *sys.argv[1:]])

"""Peak training memory of four ways to adapt a frozen ViT to video: `mad bench memory` as a script.

    python benchmarks/bench_memory.py --frames 8 --batch 2          # ViT-B-16, bf16, random weights
    python benchmarks/bench_memory.py --model ViT-L-14 --batch 1 --layers 8,16,24
    python benchmarks/bench_memory.py --budget-gb 8                 # also: largest batch within 8 GiB

Takes the same options as `mad bench memory` (see --help); the code is in mad/bench/memory/ (package),
the measured results and how to read them in docs/benchmarks/memory.md (rendered from benchmarks/notes/memory.md
and the JSON).
"""

import sys

from mad.cli import app

if __name__ == "__main__":
    sys.exit(app(["bench", "memory", *sys.argv[1:]], prog_name="bench_memory.py"))

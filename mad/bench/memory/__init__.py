"""`mad bench memory`: measured training memory of the ways to adapt a frozen ViT to video.

Every mode trains on the same backbone architecture (random weights: memory and time
do not depend on weight values), frames, batch and precision, with the same step,
`mad.adapt.step.train_step` (forward, label-smoothed cross-entropy, backward, gradient
clipping, AdamW step), as `mad train` runs it:

    full-finetune         every backbone weight trained, linear head on CLS averaged over T
    in-backbone-adapter   frozen backbone, ST-Adapter-style temporal adapter before attention
                          in every block: gradients flow back through the whole backbone
    madapter-online       backbone under no_grad each step, M-adapter branch trained on its taps
    madapter-cached       M-adapter branch trained from float16 tokens as read from the cache;
                          no backbone exists in that process
    evl-online            backbone under no_grad each step, EVL's decoder trained on its last blocks
                          (q, k recomputed from the block inputs, as from the cache)
    evl-cached            EVL's decoder trained from float16 levels as read from the cache; no backbone

Each mode runs in a fresh subprocess (`python -m mad.bench.memory --mode X --config JSON`,
one JSON line on stdout), so one mode's allocator state cannot leak into another's
figure. Peak memory: CUDA `max_memory_allocated` over the timed steps; CPU the
process's peak resident set (VmHWM, reset after the warm-up step) minus its
resident set just before the model was built.

Data loading is excluded from the figures: every step reuses one batch made in memory
when the mode is built (uint8 frames, or float16 tokens as the cache reader returns
them; that batch is counted), and no video is decoded, no cache read, no loader worker run.

Precision: on CUDA trained modules keep fp32 weights and every step runs under autocast to
the benchmark precision. On CPU no step runs under autocast (CPU autocast makes a ViT-B/16
forward 7-11x slower than casting its weights): the backbone and the in-backbone adapters
are cast to the benchmark precision, heads and the M-adapter branch keep fp32 weights and
compute in fp32, as `mad train --precision auto` does on CPU (workloads.py).

    config.py     modes, BenchConfig, BenchError, the checks of the options
    workloads.py  the modes built (ST-Adapter's TemporalAdapter, public-API attention)
    meter.py      peak memory of a process
    harness.py    one mode in one process (child), starting such processes, the budget search
    report.py     ratios, table, JSON and chart
    run.py        run_benchmark

The mode processes import this package: every top-level import in it is torch or the
standard library (no open_clip, rich, matplotlib), so the cached mode's process holds
nothing but the branch.
"""

from mad.bench.memory.config import MODES, REFERENCE_MODE, BenchConfig, BenchError, resolve_config
from mad.bench.memory.harness import find_max_batch, run_child, run_mode
from mad.bench.memory.run import run_benchmark
from mad.bench.memory.workloads import TemporalAdapter

__all__ = ["MODES", "REFERENCE_MODE", "BenchConfig", "BenchError", "TemporalAdapter", "find_max_batch",
           "resolve_config", "run_benchmark", "run_child", "run_mode"]

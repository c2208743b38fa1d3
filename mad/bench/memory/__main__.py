"""`python -m mad.bench.memory --mode X --config JSON [--limit-gb G]`: one mode, one JSON line (harness.py)."""

from mad.bench.memory.harness import child_main

child_main()

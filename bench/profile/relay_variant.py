"""Run ``python -m relaycore serve`` with an interpreter-level variation, to measure what a
proposed relay change would buy before anyone changes ``src/`` (bench/run.py
``--relay-variant``).

    python bench/profile/relay_variant.py gc-off   serve --port 0 ...   # no cyclic GC at all
    python bench/profile/relay_variant.py gc-tuned serve --port 0 ...   # gen0 threshold 50,000,
                                                                        # freeze every second
"""

import gc
import sys
import threading
import time

from relaycore.__main__ import main

variant = sys.argv.pop(1)
if variant == "gc-off":
    gc.disable()
elif variant == "gc-tuned":
    gc.set_threshold(50_000, 50, 1000)

    def freezer() -> None:  # what a relay would do after accepting a burst of connections
        while True:
            time.sleep(1.0)
            gc.freeze()

    threading.Thread(target=freezer, daemon=True).start()
elif variant != "none":
    raise SystemExit(f"unknown variant {variant!r}")
sys.exit(main())

"""Compare rotation runs: ``python simulations/compare.py DIR1 DIR2 ... [--out DIR]``.

Writes ``comparison.md``, ``comparison.json`` (per-setting mean C-index with bootstrap CI beside the ceilings;
paired differences to DIR1 with bootstrap CI and Wilcoxon p) and ``forest.png``. See fedprog/compare.py.
"""

from __future__ import annotations

import sys

from fedprog.compare import main

if __name__ == "__main__":
    sys.exit(main())

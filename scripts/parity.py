"""Print the exactness table: every handwritten Function against torch, per tensor.

    python scripts/parity.py                 # CPU, float32 and float64
    python scripts/parity.py --device cuda   # a GPU, TF32 off

See ``manualbp/tools/parity.py`` for the cases and the statistics.
"""

from manualbp.tools.parity import main

if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark handwritten backward passes against builtin autograd (thin wrapper).

    python scripts/benchmark.py                  # full run on CUDA if present, else CPU
    python scripts/benchmark.py --quick          # a short smoke run
    python scripts/benchmark.py --json out.json --markdown out.md

See ``manualbp/tools/benchmark.py`` for the method.
"""

from manualbp.tools.benchmark import main

if __name__ == "__main__":
    main()

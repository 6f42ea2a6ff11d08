"""Provision MNIST under a data root and show where each verified file came from.

Usage: ``python scripts/fetch_data.py [--root DIR]`` (default root: ``$MANUALBP_DATA_DIR`` or
``./data``). Exits with status 1 and an explanation when no source can provide the files. The
logic lives in :func:`manualbp.data.provision.fetch_main`, so the ``manualbp`` CLI can reuse it.
"""

from __future__ import annotations

from manualbp.data.provision import fetch_main

if __name__ == "__main__":
    raise SystemExit(fetch_main())

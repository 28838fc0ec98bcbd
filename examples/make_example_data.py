"""Re-create the example data under examples/data (it is committed; this shows how it was made).

    python examples/make_example_data.py
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from biapy.data.synthetic import make_example_data  # noqa: E402

if __name__ == "__main__":
    # No options: argparse only answers --help (and refuses anything else) instead of rewriting the data.
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    root = make_example_data(Path(__file__).resolve().parent / "data")
    print(f"example data written to {root}")

"""``python -m fastnn.benchmarking``: the same as ``fastnn bench``."""
import argparse
import sys

from fastnn.benchmarking import add_arguments, main

if __name__ == "__main__":  # pragma: no cover - ``fastnn bench`` is the entry point
    p = argparse.ArgumentParser(prog="python -m fastnn.benchmarking")
    add_arguments(p)
    sys.exit(main(p.parse_args()))

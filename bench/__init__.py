"""Fan-out benchmark: the gateway against the naive Python design and nchan, side by side (issue 3).

Run `python -m bench --quick` (about a minute) or `python -m bench --full`; see bench/README.md.
"""

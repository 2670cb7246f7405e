"""refine's benchmarks: ``python -m bench.run`` (``make bench``); see bench/README.md."""

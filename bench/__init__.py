"""petlsearch benchmarks: `python -m bench [--quick] [--only NAME,...]` (see docs/benchmarks.md)."""

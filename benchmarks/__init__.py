"""shmfault's benchmarks: ``python -m benchmarks --help``; results in docs/benchmarks.md."""

"""Benchmarks: plans of every workload, and (later) kernels and models against eager and inductor."""

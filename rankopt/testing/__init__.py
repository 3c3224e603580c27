"""Instruments for tests and benchmarks: ``host_syncs`` counts the ops and host syncs a step would cost
a GPU, on the CPU. Measures from outside: may import no other rankopt package."""

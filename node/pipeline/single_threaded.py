"""Imported first by the decoders' forkserver: numerical libraries start single-threaded.

OpenBLAS and OpenMP read these variables once, when numpy loads. Set later
(in a worker's initializer) they change nothing, and a decoder's numpy then
runs a thread per core that spins while it waits: decoding audio cost four
times its CPU time beside busy encoders (bench/bench_e2e.py). Encoder
workers, started by the same forkserver, set torch's threads themselves.
"""

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

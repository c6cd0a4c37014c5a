"""Block-wise SignRound tuning: fake-quant leaves, layer selection, calibration caching, the jit-compiled step."""

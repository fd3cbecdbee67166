"""What ``voxtral bench`` and the scripts in bench/ measure with: the benchmark runs, full-size networks with random
weights, synthetic speech-like signals, and transformers' reference model on our weights."""

"""Pure-PyTorch implementations of every op: the CPU path and the test oracle."""

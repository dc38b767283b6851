"""FP8 mixed precision (paper 3.3). Today: the project Linear class that every projection goes through."""

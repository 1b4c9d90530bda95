"""Tuneboard GPU side: the job loop, the training recipe and inference."""

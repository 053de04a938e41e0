"""Evaluation: batched generation and the official BLEU-4 / ROUGE metrics."""

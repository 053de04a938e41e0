"""P-tuning v2 training: configuration, the loop, validation, logging and checkpoints."""

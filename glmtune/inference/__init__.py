"""Using a tuned model from Python: chat prompts, the context window, response processing."""

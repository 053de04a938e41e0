"""ChatGLM2-6B (and chatglm2-6b-32k): SentencePiece tokenizer, round-numbered prompts."""

"""Model families: a registry, and one package per family with its tokenizer, chat rules and fine-tuning data rules."""

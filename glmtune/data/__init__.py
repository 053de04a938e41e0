"""Fine-tuning data: file formats, the official preprocessing, and the tokenized store."""

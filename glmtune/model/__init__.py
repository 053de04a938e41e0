"""The network: transformers' GLM model with a P-tuning v2 prefix, loading/saving the official layout, quantization and CPU kernels."""

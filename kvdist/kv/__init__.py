"""The KV data plane: cache layout, block hashing, batched block transfers."""

"""The DeepSeek-V2/V3 network in plain PyTorch, one process."""

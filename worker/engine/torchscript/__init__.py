"""TorchScript (legacy): torch.ao JIT quantization, one module per method; common.py is shared."""

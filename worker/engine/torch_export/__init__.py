"""torch.export (.pt2) programs: torchao PT2E and weight-only, one module per method; common.py is shared."""

# ruff: noqa
# The instructor's case: a file whose class body never ends.
import torch.nn as nn


class Model(nn.Module):
    while True:
        pass

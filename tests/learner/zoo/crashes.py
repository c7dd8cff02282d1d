# ruff: noqa
# The instructor's case: a file whose class body exits the interpreter.
import os

import torch.nn as nn


class Model(nn.Module):
    os._exit(3)

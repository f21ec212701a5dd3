"""Test-session settings: one torch thread (the suite evaluates many small systems, where a second thread
only adds wake-up latency, and results stay bit-for-bit reproducible)."""

import torch

torch.set_num_threads(1)

"""The ``so3krates`` command line: one module per command group, sharing the helpers below."""


def set_torch_threads(threads: int | None) -> None:
    """Sets torch's intra-op threads when the user gave ``--threads`` (torch is imported only then)."""
    if threads:
        import torch

        torch.set_num_threads(threads)

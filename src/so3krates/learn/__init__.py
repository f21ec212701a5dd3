"""Active learning: committees trained, simulated, questioned and retrained (``so3krates learn``)."""

from so3krates.learn.config import LearnConfig, load_learn_config
from so3krates.learn.loop import learn

__all__ = ["LearnConfig", "learn", "load_learn_config"]

"""Compat import path of Hina's original code and guides: ``from library.custom_hina_adamw_optimizer import HinaAdamWOptimizer``."""

from library.optimizers.hina_adamw import HinaAdamWOptimizer

__all__ = ["HinaAdamWOptimizer"]

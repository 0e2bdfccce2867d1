"""Compat import path of Hina's original code and guides: ``from library.automagic_sinkgd import Automagic_Sinkgd``."""

from library.optimizers.automagic import Automagic_CameAMP, Automagic_Sinkgd

__all__ = ["Automagic_CameAMP", "Automagic_Sinkgd"]

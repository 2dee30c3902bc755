"""Factorized convolution layers."""

from .base import FactorizedConv
from .cp import CPConv
from .tt import TTConv
from .tucker import TuckerConv

__all__ = ["FactorizedConv", "CPConv", "TuckerConv", "TTConv"]

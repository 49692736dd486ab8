"""Compression methods; importing this package registers every method."""

from basis_sharing.methods import asvd, basis_sharing, dense, fips, fwsvd, svd  # noqa: F401
from basis_sharing.methods.registry import METHODS, get_method, register_method  # noqa: F401

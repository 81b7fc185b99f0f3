"""The error a user's recipe, plan or model choice raises, importable from every layer.

:class:`RecipeError` lives here, below every module, so that the converters of
:mod:`lowprec.matmul`, :mod:`lowprec.scaling` and :mod:`lowprec.qat` can raise it for input they
find wrong while converting (nothing imports upward); :mod:`lowprec.recipes` re-exports it,
and the CLI turns it into a one-line message with exit status 2.
"""

from __future__ import annotations


class RecipeError(ValueError):
    """A recipe name, file or field is wrong; the message names the file, key and what was expected."""

"""Errors of steering vectors and their files (shared by ``vector`` and ``vector_io``)."""

from __future__ import annotations

import os


class SteeringVectorError(ValueError):
    """A vector's contents are invalid; the message names the file/field and the problem."""


class VectorFileError(SteeringVectorError):
    """A vector file could not be read or written; the message names the file."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

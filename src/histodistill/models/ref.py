"""One model reference: a registry name, or a distilled student `student:<run>` (`student-<run>` in paths).

The registry and the command line write a student as `student:<run>`; file and folder names hold no `:`,
so the workflow's wildcards and result paths write it as `student-<run>`. `ModelRef.parse` reads either
form and is the only place that translates between them. This module imports nothing heavy (no torch), so
the Snakefile can use it while it plans the DAG.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from histodistill.errors import ModelError

STUDENT = "student"
_NAME = re.compile(r"[A-Za-z0-9_.]+(?:-[A-Za-z0-9_.]+)*")  # a wildcard-safe name (rules/common.smk `model`)


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference.

    `name` is the registry name, or the run name of a student (`is_student`). `id` is the registry's form
    (`student:<run>` or the name), `slug` the file-safe form used in paths and wildcards (`student-<run>`
    or the name). Raises ModelError on an empty or unsafe name (anything outside `[A-Za-z0-9_.-]`).
    """

    name: str
    is_student: bool = False

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name or ""):
            kind = "student run" if self.is_student else "model name"
            raise ModelError(f"invalid {kind} '{self.name}': use letters, digits, '_', '.' and inner '-'")

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        """`student:<run>` or `student-<run>` → a student; anything else → a registry name."""
        for sep in (":", "-"):
            if text.startswith(STUDENT + sep):
                return cls(text[len(STUDENT) + 1 :], is_student=True)
        return cls(text)

    @classmethod
    def student(cls, run: str) -> ModelRef:
        return cls(run, is_student=True)

    @property
    def run(self) -> str:
        """The distillation run of a student (ModelError for a registry model)."""
        if not self.is_student:
            raise ModelError(f"'{self.name}' is a registry model, not a student:<run>")
        return self.name

    @property
    def id(self) -> str:
        """The registry's form: `student:<run>` or the registry name."""
        return f"{STUDENT}:{self.name}" if self.is_student else self.name

    @property
    def slug(self) -> str:
        """The file-safe form for paths and wildcards: `student-<run>` or the registry name."""
        return f"{STUDENT}-{self.name}" if self.is_student else self.name

    def __str__(self) -> str:
        return self.id

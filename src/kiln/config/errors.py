"""Configuration errors that point at the exact line and say how to fix it.

A bad kiln.yaml must fail before anything listens, and it must fail *once*
with every problem listed: users fix a config in one pass instead of playing
whack-a-mole with one error per run. So validation collects ConfigIssue
records and raises a single ConfigError carrying all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import FieldProblem

__all__ = ["ConfigError", "ConfigIssue", "FieldProblem"]


@dataclass
class ConfigIssue:
    """One problem in a config file.

    ``resource`` names the resource the problem belongs to (``api 'iris'``,
    ``resource #2``); it is empty for file-level problems such as a YAML
    syntax error.
    """

    file: str
    line: int | None
    field: str
    message: str
    fix: str
    resource: str = ""

    def format(self) -> str:
        """Render as ``file:line: resource field f: message. Fix: fix``."""
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        subject = " ".join(
            part for part in (self.resource, f"field {self.field}" if self.field else "") if part
        )
        text = f"{where}: "
        if subject:
            text += f"{subject}: "
        text += self.message.rstrip(". ")
        if self.fix:
            text += f". Fix: {self.fix}"
        return text

    def __str__(self) -> str:
        return self.format()


class ConfigError(Exception):
    """Raised once per load with every issue found; ``str()`` lists one per line."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = list(issues)
        super().__init__(self.__str__())

    def __str__(self) -> str:
        return "\n".join(issue.format() for issue in self.issues)

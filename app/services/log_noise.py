"""Library warnings a user cannot act on, hidden from the log on the job page (the file keeps them).

Python prints a warning as its message line and then, indented, the source line that raised it
(`  warnings.warn(`); both go."""

from __future__ import annotations

import re

NOISE = re.compile(
    "|".join(
        (
            # Deprecations inside transformers, peft, trl, torch: fixed by their next release.
            r"\b(?:FutureWarning|DeprecationWarning|PendingDeprecationWarning): ",
            # bitsandbytes asking the `kernels` hub about kernels-community's publisher.
            r"could not verify publisher trust status",
            # liger-kernel probing backends the machine does not have.
            r"Backend impl .* could not be imported",
        )
    )
)


def without_noise(lines: list[str]) -> list[str]:
    """`lines` less the known noise: each matching line and the indented lines right after it."""
    kept: list[str] = []
    in_noise = False
    for line in lines:
        if NOISE.search(line):
            in_noise = True
        elif not (in_noise and line.startswith((" ", "\t"))):
            in_noise = False
            kept.append(line)
    return kept

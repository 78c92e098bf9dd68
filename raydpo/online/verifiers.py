"""Verifiers the project ships, for :class:`raydpo.online.judges.VerifierJudge`
(``verifier: raydpo.online.verifiers:max_task``).

A verifier is ``fn(prompt_text, completion, row, **kwargs) -> float``; raising is how it says it
cannot score a completion (the judge counts a ``verifier_error``).
"""
from __future__ import annotations

import re

_MAX_PROMPT = re.compile(r"max\((\d+),\s*(\d+)\)")
# End-of-sequence texts that a decode with special tokens kept: the answer ends before them.
_EOS_TEXT = re.compile(r"<\|end\|>|<\|endoftext\|>|<\|im_end\|>|<\|eot_id\|>|</s>|<eos>")


def max_task(prompt: str, completion: str, row: dict) -> float:
    """The synthetic ``max`` task (:mod:`raydpo.data.synthetic`): ``max(07,42)=`` is answered ``42``.

    1.0 for exactly the answer (after cutting at an EOS text and stripping whitespace). Otherwise a
    ladder of partial credit, so that a random-init model, whose samples are mostly not the answer,
    still gets pairs that point towards it (each step is what the next one builds on):

    ====================================================  ======
    what the completion starts with                       credit
    ====================================================  ======
    a digit; two digits (``0.1`` per leading digit)        +0.1 / +0.2
    the answer's first digit                               +0.1
    one of the two operands                                +0.3
    the larger operand (the answer)                        +0.2
    an operand and nothing after it (the wrong one)        +0.1
    ====================================================  ======

    So ``"xy"`` 0, ``"5"`` 0.1, ``"4"`` 0.2, ``"53"`` 0.2, ``"07x"`` 0.5, ``"07"`` 0.6,
    ``"42x"`` 0.8, ``"42"`` 1.0 for ``max(07,42)=``. The operands come from the prompt text (a
    row need not carry the answer); a prompt that is not a ``max(..,..)`` question raises ValueError.
    """
    m = _MAX_PROMPT.search(prompt)
    if m is None:
        raise ValueError(f"max_task: the prompt {prompt[:80]!r} is not a max(a,b) question")
    a, b = m.group(1), m.group(2)
    answer, other = (a, b) if int(a) >= int(b) else (b, a)
    text = _EOS_TEXT.split(completion, maxsplit=1)[0].strip()
    if text == answer:
        return 1.0
    head = text[: len(answer)]
    digits = len(head) - len(head.lstrip("0123456789"))
    credit = 0.1 * min(digits, 2)
    if head[:1] == answer[:1]:
        credit += 0.1
    if head == answer or text[: len(other)] == other:
        credit += 0.3
        if head == answer:
            credit += 0.2
        elif text == other:
            credit += 0.1
    return round(credit, 6)

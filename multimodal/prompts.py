"""Prompt checks shared by every text-conditioned pipeline (text-to-image, text-to-music). Standard library only."""
from __future__ import annotations

import unicodedata
from typing import Any

from dreamlab.errors import DreamlabError

MAX_PROMPT_CHARS = 300


def check_prompt(prompt: Any, *, example: str, what: str = "prompt", max_chars: int = MAX_PROMPT_CHARS) -> str:
    """A prompt must be a non-empty string of plain text of at most `max_chars` characters; `example` is named in
    the error as what to pass instead."""
    if not isinstance(prompt, str):
        raise DreamlabError(f"{what} must be a string, got {type(prompt).__name__}; pass text such as {example!r}")
    if not prompt.strip():
        raise DreamlabError(f"{what} is empty; pass text such as {example!r}")
    if len(prompt) > max_chars:
        raise DreamlabError(f"{what} has {len(prompt)} characters; shorten it to at most {max_chars}")
    # bytes that were not UTF-8 on the command line arrive as lone surrogates: printing or saving the prompt failed
    bad = next((i for i, ch in enumerate(prompt) if "\ud800" <= ch <= "\udfff"
                or (unicodedata.category(ch) == "Cc" and ch not in "\t\n\r")), None)
    if bad is not None:
        kind = "a byte that is not UTF-8" if "\ud800" <= prompt[bad] <= "\udfff" else "a control character"
        raise DreamlabError(f"{what} holds {kind} at position {bad} ({prompt[bad]!a}); pass plain text such as "
                            f"{example!r}")
    return prompt


def check_prompts(prompt: Any, *, example: str, max_chars: int = MAX_PROMPT_CHARS) -> list[str]:
    """One prompt or a non-empty list of them, each checked by `check_prompt`."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise DreamlabError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    return [check_prompt(p, example=example, what=f"prompt[{i}]" if len(prompts) > 1 else "prompt",
                         max_chars=max_chars) for i, p in enumerate(prompts)]

"""Caption processing as kohya sd-scripts does it: prefix/suffix, wildcards, tag shuffling with kept
tokens, tag dropout and the secondary separator.

A caption is a list of tags separated by `caption_separator` (","). Each step, `process_caption`
shuffles the tags after the first `keep_tokens` (`shuffle_caption`), drops each shuffled tag with
probability `caption_tag_dropout_rate`, and joins them with ", ". With `keep_tokens_separator`
("|||") in the caption, the part before it (and after a second one) is kept in place instead of
the first `keep_tokens` tags. `secondary_separator` (";;;") binds several tags into one for the
shuffle and becomes `caption_separator` afterwards. With `enable_wildcard`, a multi-line caption
uses one line drawn at random and `{a|b|c}` one of its choices (`{{`/`}}` for literal braces);
without it, the first line. All randomness comes from the `rng` passed in, which the dataset seeds
with (seed, epoch, item), so a resumed run sees the same captions as an uninterrupted one.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

_WILDCARD = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class CaptionOptions:
    """How an image's caption becomes the prompt of a step (kohya's subset options)."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_separator: str = ","
    keep_tokens_separator: str = ""
    secondary_separator: str = ""
    caption_prefix: str = ""
    caption_suffix: str = ""
    caption_tag_dropout_rate: float = 0.0
    enable_wildcard: bool = False

    @property
    def varies(self) -> bool:
        """Whether one caption can give different prompts from step to step."""
        return self.shuffle_caption or self.caption_tag_dropout_rate > 0 or self.enable_wildcard


def _tags(text: str, separator: str) -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    """One line of a multi-line caption and one choice of each `{a|b}`, drawn from `rng`."""
    lines = [line for line in caption.split("\n") if line.strip()] or [""]
    caption = rng.choice(lines)
    open_mark, close_mark = "\x00", "\x01"  # stand-ins for the escaped `{{` and `}}`
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def process_caption(caption: str, options: CaptionOptions, rng: random.Random) -> str:
    """The prompt of one step for `caption` under `options` (see the module docstring)."""
    o = options
    if o.caption_prefix:
        caption = f"{o.caption_prefix} {caption}"
    if o.caption_suffix:
        caption = f"{caption} {o.caption_suffix}"
    caption = _expand_wildcards(caption, rng) if o.enable_wildcard else caption.split("\n")[0]
    separated = bool(o.keep_tokens_separator) and o.keep_tokens_separator in caption
    if o.shuffle_caption or o.caption_tag_dropout_rate > 0 or separated:
        head, tail = [], []
        if separated:
            fixed, flex = caption.split(o.keep_tokens_separator, 1)
            if o.keep_tokens_separator in flex:
                flex, fixed_end = flex.split(o.keep_tokens_separator, 1)
                tail = _tags(fixed_end, o.caption_separator)
            head, flex_tags = _tags(fixed, o.caption_separator), _tags(flex, o.caption_separator)
        else:
            tags = _tags(caption, o.caption_separator)
            head, flex_tags = tags[:o.keep_tokens], tags[o.keep_tokens:]
        if o.shuffle_caption:
            rng.shuffle(flex_tags)
        if o.caption_tag_dropout_rate > 0:
            flex_tags = [t for t in flex_tags if rng.random() >= o.caption_tag_dropout_rate]
        caption = ", ".join(head + flex_tags + tail)
    if o.secondary_separator:
        caption = caption.replace(o.secondary_separator, o.caption_separator)
    return caption


__all__ = ["CaptionOptions", "process_caption"]

"""Category paths as catalogs have them: any UTF-8 text, levels split by a configurable separator
(`dataset.category_separator`: "/" by default, ">" for the Google product taxonomy, "|", ...).

Each level is normalised for comparison (Unicode NFKC, case-folded, whitespace runs collapsed to
one space, trimmed) and the levels are joined with "/" into the *key* the pipeline stores in the
`category` column and compares (judgments: same key = same leaf concept, same first level = same
function). The text as given is kept in `category_display`. A "/" inside a level (possible when the
separator is another character, e.g. "Apparel > T-Shirts/Tops") becomes U+2215 DIVISION SLASH in
the key, so the key's levels are exactly the input's levels.

The rule on a key is structural only (any alphabet, any script): not empty, no empty level, at most
`validation.category_max_depth` levels.
"""
from __future__ import annotations

import unicodedata
from functools import lru_cache

from data.schema import CatalogError

KEY_SEPARATOR = "/"
LEVEL_SLASH = "\u2215"     # a "/" inside a level, in the key
DEFAULT_SEPARATOR = "/"
DEFAULT_MAX_DEPTH = 8


def separator(value) -> str:
    """The configured separator, checked: a non-empty string. YAML reads a bare `>` or `|` as an
    (empty) block scalar (in params.yaml; `--set` keeps it), so an empty value gets a hint to quote it."""
    if value is None:
        return DEFAULT_SEPARATOR
    if not isinstance(value, str) or not value.strip():
        raise CatalogError(f"dataset.category_separator must be a non-empty string, got {value!r} "
                           "(in params.yaml, quote '>' and '|': category_separator: '>')")
    return unicodedata.normalize("NFKC", value.strip())


def normalize_text(text: str) -> str:
    """NFKC, whitespace runs (newlines and tabs too) -> one space, trimmed. Case is kept (titles)."""
    return " ".join(unicodedata.normalize("NFKC", str(text)).split())


def normalize_level(text: str) -> str:
    """One level for comparison: NFKC, case-folded (NFKC again: folding may leave a compatibility
    form), whitespace collapsed, trimmed."""
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", str(text)).casefold())
    return " ".join(folded.split())


def split_levels(text: str, sep: str = DEFAULT_SEPARATOR) -> list[str]:
    """The levels of a category as given (NFKC first, so a full-width separator counts too)."""
    return unicodedata.normalize("NFKC", str(text)).split(sep)


def category_key(text: str, sep: str = DEFAULT_SEPARATOR) -> str:
    """The normalised path the pipeline compares: levels normalised and joined with "/"."""
    return KEY_SEPARATOR.join(normalize_level(level).replace(KEY_SEPARATOR, LEVEL_SLASH)
                              for level in split_levels(text, sep))


@lru_cache(maxsize=65536)
def key_of(text: str) -> str:
    """category_key of a value already split by "/" (a stored category): idempotent on keys, so
    comparisons of stored categories normalise whatever a table holds."""
    return category_key(text, KEY_SEPARATOR)


def path_problem(key, max_depth: int = DEFAULT_MAX_DEPTH) -> str | None:
    """Why a category key (levels split by "/") is malformed, or None: the reason names the class
    first ("empty category", "malformed category path (...)")."""
    if key is None or not isinstance(key, str):
        return "empty category"
    if not key.strip():
        return "empty category"
    levels = key.split(KEY_SEPARATOR)
    empty = [i + 1 for i, level in enumerate(levels) if not level.strip()]
    if empty:
        return f"malformed category path (empty level {empty[0]} of {len(levels)})"
    if len(levels) > max_depth:
        return f"malformed category path ({len(levels)} levels > {max_depth})"
    return None


def display_names(items):
    """item_id -> the category as the catalog wrote it (`category_display`; the key for sources
    that have no other text)."""
    col = "category_display" if "category_display" in items.columns else "category"
    return items.set_index("item_id")[col]

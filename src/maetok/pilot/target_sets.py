"""MAETok variants named by their auxiliary target set, so that a pilot compares sets side by side.

    maetok pilot --variants maetok --target-sets "hog;hog,sobel;hog,texture"

trains `maetok[hog]`, `maetok[hog+sobel]` and `maetok[hog+texture]`: MAETok with `model.aux_targets` set to that
list, each target at weight 1.0 (`none`: no target), under the same budget as every other variant. The sets take
the place of `maetok` in --variants (or follow the others when it is not there), so the default variants keep
the AE and VAE as baselines. On disk a set variant's folder is `maetok-hog+sobel`: brackets are glob patterns.
"""
from __future__ import annotations

import re

from ..config import ConfigError
from ..tokenizer.targets import TARGETS

SET_VARIANT = re.compile(r"maetok\[(.*)\]")
# The characters of a target name in a set: those of the registry's names, safe in a folder name and in YAML.
TARGET_NAME = re.compile(r"[A-Za-z0-9_.-]+")
NO_TARGET = "none"


def parse_target_sets(text: str) -> list[list[str]]:
    """'hog;hog,sobel' -> [['hog'], ['hog', 'sobel']]; `none` is the empty set. Names are checked by
    `check_set_variant`, once plugins are loaded."""
    sets = [[name.strip() for name in part.split(",")] for part in text.split(";") if part.strip()]
    if not sets:
        raise ConfigError(f"--target-sets {text!r} names no target set; e.g. \"hog;hog,sobel;hog,texture\"")
    for names in sets:
        bad = [n for n in names if not TARGET_NAME.fullmatch(n)]
        if bad:
            raise ConfigError(f"--target-sets {text!r}: {bad[0]!r} is not a target name; separate the names of "
                              f"a set with ',' and the sets with ';', e.g. \"hog;hog,sobel\"")
    return [[] if names == [NO_TARGET] else names for names in sets]


def set_variant(names: list[str]) -> str:
    """The variant that trains MAETok with the targets `names`: ['hog', 'sobel'] -> 'maetok[hog+sobel]'."""
    return f"maetok[{'+'.join(names) or NO_TARGET}]"


def with_target_sets(variants: list[str], text: str | None) -> list[str]:
    """`variants` with `maetok` replaced by one variant per set of `text` (appended when `maetok` is absent)."""
    if not text:
        return list(variants)
    sets = [set_variant(names) for names in parse_target_sets(text)]
    if "maetok" not in variants:
        return [*variants, *sets]
    at = variants.index("maetok")
    return [*variants[:at], *sets, *variants[at + 1:]]


def set_targets(variant: str) -> list[str] | None:
    """The target names of a set variant ('maetok[hog+sobel]' -> ['hog', 'sobel']); None for other variants."""
    match = SET_VARIANT.fullmatch(variant)
    if match is None:
        return None
    return [] if match.group(1) == NO_TARGET else match.group(1).split("+")


def base_variant(variant: str) -> str:
    """The tokenizer variant a pilot variant trains: `maetok` for a target set, else the variant itself."""
    return "maetok" if set_targets(variant) is not None else variant


def variant_folder(variant: str) -> str:
    """The variant's folder in the pilot's --out: its name, with a set's brackets dropped (maetok-hog+sobel)."""
    names = set_targets(variant)
    return variant if names is None else f"maetok-{'+'.join(names) or NO_TARGET}"


def check_set_variant(variant: str) -> None:
    """A set variant's names are registered targets, each named once; one ConfigError line otherwise."""
    names = set_targets(variant) or []
    bad = [n for n in names if not TARGET_NAME.fullmatch(n)]
    if bad:
        raise ConfigError(f"variant {variant}: {bad[0]!r} is not a target name; write a target set as "
                          f"maetok[hog+sobel]")
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise ConfigError(f"variant {variant}: unknown auxiliary target {unknown[0]!r}; registered targets: "
                          f"{', '.join(sorted(TARGETS))} (load your own with --plugin FILE)")
    if len(set(names)) != len(names):
        raise ConfigError(f"variant {variant} names a target twice")


def aux_targets_override(variant: str) -> str:
    """The tokenizer override that gives a set variant its targets, each at weight 1.0."""
    entries = ", ".join(f"{{name: {name}, weight: 1.0}}" for name in set_targets(variant) or [])
    return f"model.aux_targets=[{entries}]"

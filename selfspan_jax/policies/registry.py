"""Policies by name: one mapping from a name to its class serves bare names and specs.

A spec is "name" or "name(key=value, ...)" with YAML scalar values, e.g. "sparq(r=8,k=16)";
the class's dataclass defaults fill what a spec leaves out, and the class builds itself from the
settings and the caller's `PolicyContext` (`Policy.from_settings`). A new policy is a `Policy`
subclass with a `name`, added with `register_policy`.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from selfspan_jax.policies.adore import AdorePolicy
from selfspan_jax.policies.base import DensePolicy, Policy, PolicyContext
from selfspan_jax.policies.quest import QuestPolicy
from selfspan_jax.policies.self_span import SelfSpanPolicy
from selfspan_jax.policies.sparq import SparQPolicy

POLICIES: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Make `cls` reachable by its `name` in `make_policy` and every script's --policies (a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise ValueError(f"register_policy takes a Policy subclass, got {cls!r}")
    if cls.name in POLICIES and POLICIES[cls.name] is not cls:
        raise ValueError(f"a policy named {cls.name!r} is registered already ({POLICIES[cls.name].__name__})")
    POLICIES[cls.name] = cls
    return cls


for _cls in (DensePolicy, SelfSpanPolicy, QuestPolicy, SparQPolicy, AdorePolicy):
    register_policy(_cls)


def parse_policy_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """"name" or "name(key=value, ...)" -> (name, settings); values are YAML scalars."""
    name, paren, rest = spec.strip().partition("(")
    name = name.strip()
    if name not in POLICIES or (paren and not rest.endswith(")")):
        raise ValueError(f"policy spec {spec!r}: expected one of {sorted(POLICIES)}, optionally followed by "
                         "(key=value, ...)")
    given: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest[:-1].split(","))):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq:
            raise ValueError(f"policy spec {spec!r}: {item!r} is not key=value")
        if key in given:
            raise ValueError(f"policy spec {spec!r}: {key!r} is given twice")
        if not value:
            raise ValueError(f"policy spec {spec!r}: {key!r} has no value")
        try:
            given[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"policy spec {spec!r}: the value of {key!r}, {value!r}, is not a plain number, "
                             "bool or string") from None
    return name, given


def split_policy_specs(text: str) -> list[str]:
    """"dense,quest(page_budget=2),sparq(r=8,k=16)" -> its specs (commas inside parentheses kept)."""
    return [p.strip() for p in re.split(r",(?![^()]*\))", text) if p.strip()]


def make_policy(policy: str | Policy, *, tokenizer=None, max_segments: int | None = None,
                adore_controller=None, run_dir=None, model_config=None) -> Policy:
    """A policy from its name or spec (a `Policy` passes through).

    "dense", "self_span" (span tokens from `tokenizer`; `max_segments` the run's limit), "quest"
    (8 pages), "sparq" (r=16, k=64, local window 16: the paper's 1/8 setting at head dim 128) and
    "adore" (budget 64, 4 rebuilt; the controller `adore_controller`, "adore(controller=DIR)" or the
    run's own under `run_dir`; `PolicyContext`);
    "quest(page_budget=3)", "sparq(r=8,k=16,local_window=4)" and "adore(budget=32,rebuild=2)" set
    the dataclass fields (what `scripts/evaluate.py --policies` and the comparison script take).
    """
    if isinstance(policy, Policy):
        return policy
    if not isinstance(policy, str):
        raise ValueError(f"policy must be a name, a spec or a Policy, got {policy!r}")
    name, settings = parse_policy_spec(policy)
    context = PolicyContext(tokenizer=tokenizer, max_segments=max_segments, adore_controller=adore_controller,
                            run_dir=run_dir, model_config=model_config)
    try:
        return POLICIES[name].from_settings(settings, context)
    except TypeError as err:
        raise ValueError(f"policy spec {policy!r}: {err}") from err

"""Constrained decoding: regex / JSON schema / grammar constraints, token masks and jump-forward.

Masks come from llguidance (chosen by measurement: README, "Constrained decoding"); the runtime parts are
ours: compilation off the scheduler's critical path with a cache keyed by the spec, one vectorised mask over the
batch's logits, and the compressed-FSM jump-forward with re-tokenization at the boundary (SGLang paper, §4).
"""

from radixflow.runtime.constrained.spec import Constraint, constraint_of, json_object_schema

__all__ = ["Constraint", "constraint_of", "json_object_schema"]

"""Schemathesis hooks for tests/test_openapi_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

POST /txn enforces one rule that JSON Schema cannot state, so a body the
document allows may still rightly get a 400, which the fuzzer would count
as valid data rejected: a branch may write (put or delete) a key only once,
and read (get) it only once (JSON Schema cannot say "no two items of this
array share the value of a member").

Rather than accept any 400 from /txn as valid data accepted (which would
hide a real one), each positive case gets a fresh key for every repeated
write or read; everything else about it, and every negative case, is sent
as generated.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis import GenerationMode


@schemathesis.hook("map_case").apply_to(method="POST", path="/txn")
def within_txn_rules(context: schemathesis.HookContext, case: schemathesis.Case) -> Any:
    if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
        return case
    body = case.body
    if not isinstance(body, dict):
        return case
    for branch in ("then", "else"):
        seen: dict[str, set[str]] = {"written": set(), "read": set()}
        for index, operation in enumerate(body.get(branch) or []):
            verb = next((verb for verb in ("put", "delete", "get") if verb in operation), None)
            if verb is None:
                continue
            done = seen["read" if verb == "get" else "written"]
            key, again = operation[verb], 0
            while key in done:  # short and plain: valid wherever the original was
                again += 1
                key = f"{operation[verb][:40]}~{index}.{again}"
            operation[verb] = key
            done.add(key)
    return case

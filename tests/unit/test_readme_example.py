"""The README's "Bring your own processes" example is a process module that works."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest

from flowgate.services.background.callbacks import signed_headers, signer
from flowgate.services.worker.registry import BusinessRuleError, Process, Registry
from flowgate.testing import Completed, run_step

README = Path(__file__).parents[2] / "README.md"


def example_module() -> types.ModuleType:
    section = README.read_text().split("## Bring your own processes", 1)[1]
    # The section's first code block is the process module (the next ones test it).
    code = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.DOTALL)[0]
    module = types.ModuleType("readme_example")
    exec(compile(code, str(README), "exec"), module.__dict__)
    return module


async def test_the_readme_example_declares_a_servable_process() -> None:
    module = example_module()
    process = module.process
    assert isinstance(process, Process)
    registry = Registry.of([process])
    assert registry.topics == ("approve-invoice.check-invoice", "erp-booking")
    checked = registry.get("approve-invoice.check-invoice")
    assert checked is not None
    assert await checked.fn(checked.input_model(invoiceId="i-1", amount=10)) == {"checked": True}
    with pytest.raises(BusinessRuleError, match="amount must be > 0"):
        await checked.fn(checked.input_model(invoiceId="i-1", amount=0))
    booked = registry.get("erp-booking", "approve-invoice")
    assert booked is not None
    assert booked.step.finishes_run
    assert booked.blocking
    told = await run_step(process, "check-invoice", {"invoiceId": "i-1", "amount": 10})
    assert told == Completed({"checked": True})


def test_the_readme_signature_check_accepts_what_flowgate_signs() -> None:
    section = README.read_text().split("### Milestones, live progress", 1)[1]
    code = next(c for c in re.findall(r"```python\n(.*?)```", section, re.DOTALL) if "Webhook" in c)
    namespace: dict[str, object] = {}
    exec(compile(code, str(README), "exec"), namespace)
    verified = namespace["verified"]
    assert callable(verified)
    secret, other = "whsec_" + "c2VjcmV0LWtleS1vZi1hLXJlY2VpdmVy", "whsec_b3RoZXIta2V5"
    body = b'{"status":"ok","correlationId":"c"}'
    headers = signed_headers(signer(secret), "run-1", body)
    assert verified(secret, headers, body)
    assert not verified(other, headers, body)
    assert not verified(secret, headers, body + b" ")
    assert not verified(secret, {**headers, "webhook-id": "run-2"}, body)

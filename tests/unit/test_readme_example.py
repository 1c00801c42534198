"""The README's "Bring your own processes" example is a process module that works."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest

from services.worker.registry import BusinessRuleError, Process, Registry

README = Path(__file__).parents[2] / "README.md"


def example_module() -> types.ModuleType:
    section = README.read_text().split("## Bring your own processes", 1)[1]
    [code] = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.DOTALL)
    module = types.ModuleType("readme_example")
    exec(compile(code, str(README), "exec"), module.__dict__)
    return module


async def test_the_readme_example_declares_a_servable_process() -> None:
    module = example_module()
    process = module.process
    assert isinstance(process, Process)
    registry = Registry.of([process])
    assert registry.topics == ("approve-invoice.check-invoice", "approve-invoice.book-invoice")
    checked = registry.get("approve-invoice.check-invoice")
    assert await checked.fn(checked.input_model(invoiceId="i-1", amount=10)) == {"checked": True}
    with pytest.raises(BusinessRuleError, match="amount must be > 0"):
        await checked.fn(checked.input_model(invoiceId="i-1", amount=0))
    assert registry.get("approve-invoice.book-invoice").step.finishes_run

"""``approve-order``: the second example process, the one people and other systems take part
in (bpmn/approve-order.bpmn; the README's "Talking to a running process").

review and sign-off are user tasks (a client completes them: ``POST
/api/process/tasks/{correlationId}/{taskId}/complete`` with ``{"variables": {"approved":
true}}``); once approved the run waits for the message ``order-confirmed`` (``POST
/api/process/message/{correlationId}``) or for ``confirmWithin`` (an ISO 8601 duration
start variable, default an hour), whichever comes first; then this worker books the order,
and its output is the run's result.
"""

from __future__ import annotations

from pydantic import BaseModel

from flowgate.handlers import Process, Step

process = Process(
    "approve-order",
    [Step("book", success="Order booked", error="Booking failed", finishes_run=True)],
)


class BookInput(BaseModel):
    orderId: str
    paymentReference: str | None = None


@process.handler("book")
async def book(data: BookInput) -> dict[str, object]:
    return {"orderId": data.orderId, "booked": True, "paymentReference": data.paymentReference}

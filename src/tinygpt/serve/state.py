"""What the routes read: the model served, its limits, and the worker that runs it.

``create_app`` puts one ``AppState`` on ``app.state.tinygpt``; the app's lifespan starts its
scheduler (the worker thread) and mailbox when the server starts and closes them when it stops.
Routes take it with ``Depends(app_state)``.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field

from starlette.requests import Request

from tinygpt.engine import Engine
from tinygpt.serve.chat import ChatTemplate
from tinygpt.serve.options import ServeLimits
from tinygpt.serve.scheduler import Scheduler
from tinygpt.serve.stream import Mailbox
from tinygpt.tokenizer import Tokenizer


@dataclass
class ModelInfo:
    """What /v1/models and the playground say about the model."""

    id: str
    kind: str
    num_params: int
    vocab_size: int
    block_size: int
    created: int
    step: int | None = None
    val_loss: float | None = None


@dataclass
class AppState:
    """The model and its limits; ``scheduler`` and ``mailbox`` exist while the server runs."""

    engine: Engine
    tokenizer: Tokenizer
    info: ModelInfo
    limits: ServeLimits
    chat: ChatTemplate = field(default_factory=ChatTemplate)  # how chat messages become a prompt
    scheduler: Scheduler = field(init=False)
    mailbox: Mailbox = field(init=False)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the worker thread; its output reaches requests on ``loop``."""
        self.mailbox = Mailbox(loop)
        self.scheduler = Scheduler(self.engine, self.tokenizer, self.limits.max_batch,
                                   self.limits.max_queue)

    def model_card(self) -> dict:
        """The model as /v1/models lists it, tinygpt's details (and limits) under "tinygpt"."""
        details = asdict(self.info)
        details.pop("id")
        details.pop("created")
        details["limits"] = asdict(self.limits)
        return {"id": self.info.id, "object": "model", "created": self.info.created,
                "owned_by": "tinygpt", "tinygpt": details}


def app_state(request: Request) -> AppState:
    """The ``AppState`` of the app serving ``request`` (a FastAPI dependency)."""
    return request.app.state.tinygpt

"""TensorBoard logging for ``tinygpt train --tensorboard DIR``: what ``metrics.jsonl`` and
``loss.png`` hold, as event files ``tensorboard --logdir DIR`` shows.

Every evaluation writes its record's numbers as scalars, at the record's step:

    loss/train, loss/val                  nats per token
    bits_per_char/train, bits_per_char/val
    lr, tokens_per_s
    amp/skipped_steps, amp/loss_scale     float16 runs only (see ``tinygpt.runs.make_grad_scaler``)

and the end of the run adds the sample (text ``sample``) and the loss figure (image ``loss``).
A resumed run hides what the interrupted one logged after its checkpoint (``purge_step``), so
the curves have no doubled stretch. The writer is ``torch.utils.tensorboard.SummaryWriter``;
it is imported only when a run asks for it (the ``tensorboard`` package is the optional extra
``tinygpt[tensorboard]``).
"""

from __future__ import annotations

from pathlib import Path

from tinygpt.errors import TinyGPTError

# metrics.jsonl key -> TensorBoard tag
SCALARS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "train_bpc": "bits_per_char/train",
    "val_bpc": "bits_per_char/val",
    "lr": "lr",
    "tokens_per_s": "tokens_per_s",
    "skipped_steps": "amp/skipped_steps",
    "loss_scale": "amp/loss_scale",
}
SAMPLE_TAG = "sample"
FIGURE_TAG = "loss"
MISSING = "--tensorboard needs the tensorboard package: pip install 'tinygpt[tensorboard]'"


def require_tensorboard() -> None:
    """A one-line ``TinyGPTError`` when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:  # torch raises it when the tensorboard package is missing
        raise TinyGPTError(MISSING) from None


class TensorBoardLog:
    """One run's event files in ``log_dir``; ``purge_step``: the step a resumed run continues
    from (events the earlier process wrote from that step on are hidden)."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        try:
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
        except OSError as e:
            raise TinyGPTError(f"cannot write TensorBoard events to {log_dir}: {e}") from None

    def record(self, record: dict) -> None:
        """The numbers of one line of ``metrics.jsonl``, at its step."""
        step = record["step"]
        for key, tag in SCALARS.items():
            value = record.get(key)
            if value is not None:
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def finish(self, step: int, sample: str, figure: Path) -> None:
        """The end sample as text and ``figure`` (``loss.png``, where it was drawn) as an image."""
        if sample:
            # TensorBoard renders text as Markdown: a code block keeps the sample's line breaks.
            self.writer.add_text(SAMPLE_TAG, "```\n" + sample + "\n```", step)
        if Path(figure).is_file():
            import matplotlib.image

            try:
                image = matplotlib.image.imread(str(figure))[..., :3]  # (H, W, RGB) in [0, 1]
            except (OSError, ValueError, SyntaxError):  # a figure that cannot be read is left out
                image = None
            if image is not None:
                self.writer.add_image(FIGURE_TAG, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

"""What the user watches: the training log (a progress bar on a terminal, plain lines in a batch
log), TensorBoard, and one line per evaluation.

Only rank 0 prints and writes; the values are averaged over ranks by the loop beforehand.
DeepSpeed's own tensorboard block logs only the learning rate for a non-pipeline engine, so
every loss term, the gradient norm, lr, throughput and eval metrics are written here, with the
resolved config as text, a custom-scalars layout that overlays each term's per-layer curves,
and the run's HParams session (``dskd.training.hparams``).

``training.progress``: ``bar`` (tqdm, showing the current loss), ``log`` (a ``[train]`` line
every ``log_every`` optimizer steps and at least every ``log_every_seconds``), or ``auto``: a
bar when stderr is a terminal, lines otherwise (``sbatch`` output files, ``> run.log``), so a
batch log holds readable lines instead of carriage-return redraws.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import torch

from dskd.training import hparams as hp


def progress_mode(setting: str, stream=None) -> str:
    """``bar`` or ``log`` for ``training.progress`` (``auto``: a bar only on a terminal)."""
    if setting != "auto":
        return setting
    stream = stream or sys.stderr
    return "bar" if hasattr(stream, "isatty") and stream.isatty() else "log"


def quiet_bars_in_batch_logs(training) -> None:
    """Where the log is a file, the libraries' own bars (loading and writing shards) go too:
    each one is carriage-return redraws in an sbatch output file."""
    if progress_mode(training.progress) != "log":
        return
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def duration(seconds: float) -> str:
    """``45s``, ``12m03s``, ``3h04m``: what a log line's elapsed time and ETA read as."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def train_line(step: int, total: int, epoch: float, losses: dict[str, float], lr: float, grad_norm: float | None,
               samples_per_s: float, tokens_per_s: float, elapsed: float, eta: float | None) -> str:
    """One batch-log line: ``[train] step 40/200 epoch 0.40 | loss 0.6931 hard_ce 0.6931 ... |
    lr 5.00e-05 | grad_norm 1.234 | 85.3 samples/s 1.1k tokens/s | 12s, ETA 48s``. Per-layer
    parts of a term stay in TensorBoard."""
    terms = " ".join(f"{name} {value:.4f}" for name, value in losses.items() if name != "total" and "/" not in name)
    parts = [f"[train] step {step}/{total} epoch {epoch:.2f}",
             f"loss {losses.get('total', float('nan')):.4f}" + (f" {terms}" if terms else ""),
             f"lr {lr:.2e}"]
    if grad_norm is not None:
        parts.append(f"grad_norm {grad_norm:.4g}")
    rate = tokens_per_s / 1000
    parts.append(f"{samples_per_s:.1f} samples/s {rate:.1f}k tokens/s" if rate >= 1 else
                 f"{samples_per_s:.1f} samples/s {tokens_per_s:.0f} tokens/s")
    parts.append(f"{duration(elapsed)}" + (f", ETA {duration(eta)}" if eta is not None else ""))
    return " | ".join(parts)


class Monitor:
    def __init__(self, log_dir: Path, enabled: bool, total_steps: int, initial_step: int, desc: str,
                 progress: str = "auto", log_every_seconds: float = 0.0):
        self.enabled = enabled
        self.log_dir = Path(log_dir)
        self.writer = None
        self.bar = None
        self.mode = progress_mode(progress) if enabled else "off"
        self.total = total_steps
        self.log_every_seconds = log_every_seconds
        self.started, self.first_step = time.perf_counter(), initial_step
        self.last_line = self.started
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True, file=sys.stderr)

    # -- TensorBoard ----------------------------------------------------------------------

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def start_session(self, config: dict, config_yaml: str, role: str, argv: list[str], world_size: int,
                      task, term_names: list[str], layerwise: list[str]) -> None:
        """At every (re)start: the resolved config as text, the scalars layout and the HParams
        session, so a run shows up in the dashboard while it runs (and if it never finishes)."""
        if self.writer is None:
            return
        indented = "\n".join("    " + line for line in config_yaml.splitlines())  # markdown code block
        command = " ".join(argv)
        self.writer.add_text("config", f"`{command}` on {world_size} rank(s)\n\n{indented}", self.first_step)
        self.writer.add_custom_scalars(scalars_layout(term_names, layerwise, hp.metric_tags(task)))
        hp.clear_status(self.log_dir)
        values = hp.run_hparams(config, role, argv, world_size)
        swept = frozenset(hp.swept_keys(argv, role)) & set(values)
        for summary in hp.session_start(values, hp.metric_tags(task), swept):
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def end_session(self, succeeded: bool) -> None:
        """Completed (Success) or failed (Failure); halted and preempted runs stay open."""
        if self.enabled:
            hp.write_status(self.log_dir, succeeded)

    def attention_image(self, tag: str, student_qk, teacher_qk, mask: torch.Tensor, groups: tuple[int, int],
                        heads: int, step: int, tokens: list[str], layers: tuple[int, int]) -> None:
        """One dev example's attention: teacher | student, one row per compared head, with a colour
        bar and the tokens (``dskd.training.attention_figure``)."""
        if self.writer is None:
            return
        from dskd.training.attention_figure import attention_figure, attention_maps

        teacher, student = attention_maps(student_qk, teacher_qk, mask, groups, heads)
        self.writer.add_image(tag, attention_figure(teacher, student, tokens, layers, groups), step,
                              dataformats="HWC")

    # -- the log --------------------------------------------------------------------------

    def begin_training(self) -> None:
        """The first step is about to run: the ETA's clock starts here, after start-up (loading,
        the teacher's evaluation), which a rate per step should not include."""
        self.started = self.last_line = time.perf_counter()

    def line_due(self) -> bool:
        """Whether ``log_every_seconds`` have passed since the last ``[train]`` line (rank 0's
        clock; the loop makes every rank agree on it)."""
        return (self.mode == "log" and self.log_every_seconds > 0
                and time.perf_counter() - self.last_line >= self.log_every_seconds)

    def train_progress(self, step: int, epoch: float, losses: dict[str, float], lr: float,
                       grad_norm: float | None, samples_per_s: float, tokens_per_s: float) -> None:
        """A logging step: a ``[train]`` line in a batch log, the current loss on the bar."""
        if not self.enabled:
            return
        now = time.perf_counter()
        done = step - self.first_step
        eta = (now - self.started) / done * (self.total - step) if done > 0 else None
        if self.bar is not None:
            post = {"loss": f"{losses.get('total', float('nan')):.4f}", "lr": f"{lr:.2e}"}
            if grad_norm is not None:
                post["grad_norm"] = f"{grad_norm:.3g}"
            self.bar.set_postfix(post, refresh=False)
        elif self.mode == "log":
            print(train_line(step, self.total, epoch, losses, lr, grad_norm, samples_per_s, tokens_per_s,
                             now - self.started, eta), file=sys.stderr, flush=True)
        self.last_line = now

    def set_total(self, total: int) -> None:
        """A plateau rule ended a stage early: the run is now ``total`` steps long."""
        self.total = total
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def scalars_layout(term_names: list[str], layerwise: list[str], metrics: list[str]) -> dict:
    """TensorBoard's custom-scalars layout: every term's curve on one chart, the dev metrics on
    another, and per layer-wise term one chart overlaying its per-layer parts."""
    terms = "|".join(re.escape(n) for n in [*term_names, "total"])
    layout = {
        "losses": {
            "train: every loss term": ["Multiline", [rf"^train/loss/({terms})$"]],
            "dev metrics": ["Multiline", [rf"^{re.escape(tag)}$" for tag in metrics]],
        },
    }
    if layerwise:
        layout["per layer"] = {f"{name} by student layer": ["Multiline", [rf"^train/loss/{re.escape(name)}/L\d+$"]]
                               for name in layerwise}
    return layout

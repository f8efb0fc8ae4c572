"""Where training logs go besides the progress bar: TensorBoard, Weights & Biases, and `loss.png`.

`SFTConfig(report_to=...)` takes HF's values: "none" (the default), "tensorboard", "wandb", "all", or a list.
Each is a trainer callback that receives every logged dict (loss, learning_rate, grad_norm, tokens_per_second;
eval_loss, ...) under HF's names: `train/loss`, `train/learning_rate`, ..., `eval/loss`, at the logged step.
- TensorBoard through tensorboardX's SummaryWriter (pure Python: no torch, no TensorFlow), event files in
  `logging_dir` (default `output_dir/runs/<time>_<host>`, as HF): `tensorboard --logdir output_dir/runs`;
- W&B through `wandb.init` / `wandb.log`, offline (a run directory under `output_dir/wandb`, `wandb sync` it
  later) unless WANDB_MODE says otherwise or an API key is configured.
At the end of every `train()`, `loss.png` (train and eval loss against step) is drawn into output_dir with
matplotlib when it is installed (otherwise one line says how to get it).
"""

from __future__ import annotations

import io
import math
import os
import socket
import time
from pathlib import Path

REPORTERS = ("tensorboard", "wandb")
EXTRAS = {"tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb", "wandb"), "plot": ("matplotlib", "plot")}
LOSS_PLOT = "loss.png"


def normalize_report_to(report_to) -> tuple[str, ...]:
    """HF's `report_to` as a tuple of integration names ("none" -> ()); unknown names are refused."""
    accepted = ["none", "all", *REPORTERS]
    if report_to is None:
        return ()
    names = [report_to] if isinstance(report_to, str) else report_to
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"report_to={report_to!r} is not accepted: give a name or a list of names from {accepted}")
    out: list[str] = []
    for name in names:
        key = name.strip().lower()
        if key == "none":
            continue
        if key == "all":
            out += [r for r in REPORTERS if _installed(EXTRAS[r][0])]
            continue
        if key not in REPORTERS:
            raise ValueError(f"report_to={report_to!r} is not accepted: {name!r} is not one of {accepted}")
        out.append(key)
    return tuple(dict.fromkeys(out))


def _installed(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def require(integration: str):
    """Import the package behind an integration, or an ImportError naming the extra that installs it."""
    import importlib
    module, extra = EXTRAS[integration]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"report_to={integration!r} needs {module}: pip install 'fastlora-jax[{extra}]'") from None


def rewrite_logs(logs: dict) -> dict[str, float]:
    """HF's metric names: `eval_x` -> `eval/x`, everything else -> `train/x`; step, epoch and non-numbers left out."""
    out = {}
    for key, value in logs.items():
        if key in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(float(value)):
            continue
        out[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    return out


def default_logging_dir(output_dir) -> Path:
    return Path(output_dir) / "runs" / f"{time.strftime('%b%d_%H-%M-%S')}_{socket.gethostname()}"


class TensorBoardCallback:
    """Scalars of every logged dict into TensorBoard event files (tensorboardX)."""

    def __init__(self, logging_dir=None):
        self.tensorboardX = require("tensorboard")
        self.logging_dir = logging_dir
        self.writer = None

    def on_train_begin(self, trainer):
        if self.writer is not None:
            self.writer.close()
        directory = Path(self.logging_dir) if self.logging_dir else default_logging_dir(trainer.args.output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.writer = self.tensorboardX.SummaryWriter(logdir=str(directory))
        self.writer.add_text("args", str(trainer.args.to_dict()), 0)

    def on_log(self, trainer, logs: dict):
        if self.writer is None:
            return
        step = int(logs.get("step", trainer.state.global_step))
        for key, value in rewrite_logs(logs).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps what was logged

    def on_train_end(self, trainer, output):
        if self.writer is not None:
            step = int(output.global_step)
            for key, value in rewrite_logs(output.metrics).items():
                self.writer.add_scalar(key, value, step)
            self.writer.close()
            self.writer = None


def wandb_mode() -> str:
    """WANDB_MODE when set; "online" with an API key (env or `wandb login`'s netrc); "offline" otherwise."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class WandbCallback:
    """Every logged dict into a W&B run (project: WANDB_PROJECT or "fastlora-jax"; name: run_name)."""

    def __init__(self):
        self.wandb = require("wandb")
        self.run = None

    def on_train_begin(self, trainer):
        if self.run is not None:
            self.run.finish()
        args = trainer.args
        mode = wandb_mode()
        directory = Path(args.output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "fastlora-jax"), name=args.run_name,
                                   config=args.to_dict(), dir=str(directory), mode=mode, reinit="finish_previous")
        if mode == "offline":
            print(f"wandb: offline run in {self.run.dir} (upload with `wandb sync {Path(self.run.dir).parent}`)")

    def on_log(self, trainer, logs: dict):
        if self.run is not None:
            self.run.log(rewrite_logs(logs), step=int(logs.get("step", trainer.state.global_step)))

    def on_train_end(self, trainer, output):
        if self.run is not None:
            self.run.summary.update(rewrite_logs(output.metrics))
            self.run.finish()
            self.run = None


class LossPlotCallback:
    """`loss.png` in output_dir at the end of train(); its path printed (a hint instead without matplotlib)."""

    def on_train_end(self, trainer, output):
        path = plot_loss(trainer.state.log_history, Path(trainer.args.output_dir) / LOSS_PLOT)
        if path is not None:
            print(f"loss curve: {path}")


def plot_loss(history: list[dict], path) -> Path | None:
    """Train loss (and eval loss, when there is one) against step as a PNG, written atomically. None when
    matplotlib is missing (one line says how to install it)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(f"{LOSS_PLOT} not written: pip install 'fastlora-jax[plot]' (matplotlib) for the loss curve")
        return None
    from fastlora_jax.convert.hf_checkpoint import atomic_write_bytes

    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = sorted({h["step"]: h["eval_loss"] for h in history if "eval_loss" in h and "step" in h}.items())
    fig = Figure(figsize=(6.4, 4.0), dpi=100)  # no pyplot: no global state, no GUI backend
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="train loss", marker="." if len(train) < 50 else None)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if train or evals:
        ax.legend()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path.resolve()


def callbacks_for(args) -> list:
    """The reporting callbacks of a TrainingArguments: one per report_to integration, then the loss plot."""
    callbacks = []
    for name in normalize_report_to(args.report_to):
        callbacks.append(TensorBoardCallback(getattr(args, "logging_dir", None)) if name == "tensorboard"
                         else WandbCallback())
    return callbacks + [LossPlotCallback()]

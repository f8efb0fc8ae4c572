"""report_to (TensorBoard, W&B offline) and loss.png, against the readers of those formats (issue 18).

One short training run of the tiny Llama with report_to=["tensorboard", "wandb"] and an eval set; then
- TensorBoard's own event reader (event_accumulator) returns, for every logged dict, the trainer's values under
  HF's names (train/loss, train/learning_rate, train/grad_norm, train/tokens_per_second, eval/loss);
- wandb (offline) wrote a run directory with its run file;
- loss.png is a PNG that PIL and matplotlib's reader open.
Then the argument checks and the messages when an optional package is missing.
"""

import os
import sys

import numpy as np
import pytest

from fastlora_jax import FastLanguageModel
from fastlora_jax.data import bundled_dataset_path, load_records
from fastlora_jax.reporting import LossPlotCallback, TensorBoardCallback, callbacks_for, plot_loss
from fastlora_jax.trainer import SFTConfig, SFTTrainer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(trainer, output_dir, logging_dir) of a 6-step run logging every 2 steps, evaluating every 3."""
    from fastlora_jax.tiny import write_tiny_llama
    root = tmp_path_factory.mktemp("reporting")
    model_dir = write_tiny_llama(root / "tiny-llama", seed=0)
    model, tokenizer = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=64, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             use_gradient_checkpointing=False, random_state=0)
    records = load_records(bundled_dataset_path())
    out, logdir = root / "out", root / "out" / "tb"
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT", "WANDB_API_KEY")}
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    os.environ.pop("WANDB_API_KEY", None)
    try:
        args = SFTConfig(output_dir=str(out), per_device_train_batch_size=2, max_steps=6, learning_rate=1e-2,
                         logging_steps=2, eval_strategy="steps", eval_steps=3, save_strategy="no",
                         disable_tqdm=True, seed=0, report_to=["tensorboard", "wandb"], logging_dir=str(logdir),
                         run_name="tiny")
        trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=records[:8],
                             eval_dataset=records[8:12], args=args)
        trainer.train()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return trainer, out, logdir


def test_tensorboard_scalars_equal_the_logged_values(run):
    from tensorboard.backend.event_processing import event_accumulator
    trainer, _, logdir = run
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss": "loss", "train/learning_rate": "learning_rate", "train/grad_norm": "grad_norm",
                "train/tokens_per_second": "tokens_per_second", "eval/loss": "eval_loss"}
    assert set(expected) <= tags, tags
    for tag, key in expected.items():
        logged = {}
        for h in trainer.history:  # the last entry (the run's summary) repeats eval_loss at the final step
            if key in h:
                logged[h["step"]] = h[key]
        read = {e.step: e.value for e in acc.Scalars(tag)}
        assert sorted(read) == sorted(logged), (tag, read, logged)
        for step, value in logged.items():
            assert read[step] == pytest.approx(value, rel=1e-6, abs=1e-12), (tag, step)  # stored as float32
    losses = [e.step for e in acc.Scalars("train/loss")]
    assert losses == [2, 4, 6]
    assert "train/train_runtime" in tags  # the run's summary metrics at the last step


def test_wandb_offline_run_directory(run):
    _, out, _ = run
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir())
    files = list(runs[0].glob("run-*.wandb"))
    assert files and files[0].stat().st_size > 0


def test_loss_png_is_a_valid_png(run):
    from matplotlib import image
    from PIL import Image
    _, out, _ = run
    path = out / "loss.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    pixels = image.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert np.ptp(pixels) > 0  # something is drawn


def test_loss_png_path_is_printed(tmp_path, capsys):
    class Trainer:  # the two attributes the callback reads
        class args:
            output_dir = str(tmp_path)

        class state:
            log_history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval_loss": 1.7}]

    LossPlotCallback().on_train_end(Trainer, None)
    assert f"loss curve: {(tmp_path / 'loss.png').resolve()}" in capsys.readouterr().out
    assert (tmp_path / "loss.png").read_bytes()[:8] == PNG_SIGNATURE


def test_report_to_values():
    assert [type(c).__name__ for c in callbacks_for(SFTConfig())] == ["LossPlotCallback"]  # "none": no writers
    assert [type(c).__name__ for c in callbacks_for(SFTConfig(report_to=["none"]))] == ["LossPlotCallback"]
    names = [type(c).__name__ for c in callbacks_for(SFTConfig(report_to=["tensorboard", "wandb"]))]
    assert names == ["TensorBoardCallback", "WandbCallback", "LossPlotCallback"]
    assert [type(c).__name__ for c in callbacks_for(SFTConfig(report_to="tensorboard"))][0] == "TensorBoardCallback"
    with pytest.raises(ValueError, match=r"report_to='tensorbord'.*'none', 'all', 'tensorboard', 'wandb'"):
        SFTConfig(report_to="tensorbord")
    with pytest.raises(ValueError, match=r"'mlflow' is not one of"):
        SFTConfig(report_to=["wandb", "mlflow"])
    with pytest.raises(ValueError, match="report_to=3"):
        SFTConfig(report_to=3)


def test_missing_packages_name_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'fastlora-jax\[tensorboard\]'"):
        TensorBoardCallback()
    monkeypatch.setitem(sys.modules, "wandb", None)
    from fastlora_jax.reporting import WandbCallback
    with pytest.raises(ImportError, match=r"pip install 'fastlora-jax\[wandb\]'"):
        WandbCallback()
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    assert plot_loss([{"step": 1, "loss": 1.0}], tmp_path / "loss.png") is None
    assert capsys.readouterr().out.strip() == \
        "loss.png not written: pip install 'fastlora-jax[plot]' (matplotlib) for the loss curve"
    assert not (tmp_path / "loss.png").exists()

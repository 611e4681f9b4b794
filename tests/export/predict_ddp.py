"""`trainer.predict` of several tasks in ONE Lightning DDP launch (gloo, CPU, 2 processes), for
tests/export/test_predict.py: one DDP start-up serves every task.

    python -m tests.export.predict_ddp SPEC.json

SPEC is a list of runs `{"config": fit config, "weights": task state dict, "data": {init
args set on the datamodule}, "out": folder}`; each task is built from its config, gets the
weights (the same on both ranks: predicting does not broadcast them) and writes its
predictions with `PredictionWriter(out)`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from multimodal.eval.loading import instantiate_model_and_data
from multimodal.export.predict import PredictionWriter
from tests.helpers import quiet_trainer


def main(spec_path: str) -> None:
    runs = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    for run in runs:
        task, datamodule = instantiate_model_and_data(run["config"])
        task.load_state_dict(torch.load(run["weights"], weights_only=True))
        for name, value in run["data"].items():
            setattr(datamodule, name, value)
        trainer = quiet_trainer(
            strategy="ddp",
            devices=2,
            precision="32-true",
            callbacks=[PredictionWriter(run["out"])],
        )
        trainer.predict(task, datamodule=datamodule, return_predictions=False)


if __name__ == "__main__":
    main(sys.argv[1])

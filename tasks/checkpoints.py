"""Fine-tune checkpoints: what a retried `finetune` needs to go on where a killed one stopped.

A checkpoint holds the LoRA weights, the optimizer's state (Adam moments and its step counter), the
global step, the data order and the loss history so far. Each one is published atomically
(storage.publishing), then `latest.json` is replaced: a kill at any point leaves the previous
checkpoint usable. Checkpoints belong to one set of inputs (the stage's fingerprint); others are
ignored, so changing a Param never resumes an unrelated run.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from tasks import storage
from tasks.artifacts import ADAPTER

log = logging.getLogger("gemma_pipeline")

KEEP = 2
# Inside the checkpoint folder: latest.json points at the newest step-<n>/, which holds the adapter,
# the optimizer's variables and state.json.
LATEST = "latest.json"
OPTIMIZER = "optimizer.npz"
STATE = "state.json"


class Checkpoints:
    def __init__(self, directory: Path, fingerprint: str):
        self.dir = Path(directory)
        self.fingerprint = fingerprint

    def latest(self) -> dict | None:
        pointer = self.dir / LATEST
        if not pointer.is_file():
            return None
        latest = storage.read_json(pointer)
        state_path = self.dir / latest["dir"] / STATE
        if latest.get("fingerprint") != self.fingerprint or not state_path.is_file():
            log.warning("finetune: ignoring checkpoints in %s: they belong to other inputs", self.dir)
            return None
        return {**storage.read_json(state_path), "dir": str(self.dir / latest["dir"])}

    def save(self, step, lm, optimizer, history, base_scores, orders, train) -> None:
        import numpy as np

        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:07d}"
        final = self.dir / name
        with storage.publishing(final) as tmp:
            lm.backbone.save_lora_weights(str(tmp / ADAPTER))
            np.savez(tmp / OPTIMIZER, *[np.asarray(v.numpy()) for v in optimizer.variables])
            storage.write_json(
                tmp / STATE,
                {
                    "step": step,
                    "fingerprint": self.fingerprint,
                    "history": list(history),
                    "base_scores": base_scores,
                    "data_order": [[train[i]["id"] for i in order] for order in orders],
                    "optimizer_variables": [v.path for v in optimizer.variables],
                },
            )
        storage.write_json(self.dir / LATEST, {"dir": name, "step": step, "fingerprint": self.fingerprint})
        for old in sorted(p for p in self.dir.glob("step-*") if p.is_dir())[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("finetune: checkpoint at step %d written to %s", step, final)

    def restore(self, state: dict, lm, optimizer) -> None:
        import numpy as np

        directory = Path(state["dir"])
        lm.backbone.load_lora_weights(str(directory / ADAPTER))
        optimizer.build(lm.trainable_variables)
        saved = np.load(directory / OPTIMIZER)
        arrays = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        if len(arrays) != len(optimizer.variables):
            raise RuntimeError(
                f"checkpoint {directory} holds {len(arrays)} optimizer variables, the optimizer has "
                f"{len(optimizer.variables)}: delete {directory.parent} to start over"
            )
        for var, value in zip(optimizer.variables, arrays):
            var.assign(value)

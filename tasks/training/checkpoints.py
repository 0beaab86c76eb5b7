"""Fine-tune checkpoints: what a retried `finetune` needs to go on where a killed one stopped.

A checkpoint holds the adapter (LoRA weights and any token rows), the optimizer's state (Adam moments
and its step counter), the global step, the data order and the loss history so far, with validation
its scores so far and the best step's weights (so `keep: best` survives a kill after the best step),
and the sha256 of its files. Each one is published atomically (storage.publishing), then `latest.json` is replaced:
a kill at any point leaves the previous checkpoint usable. A checkpoint damaged afterwards (a
truncated or edited file) is detected and skipped for the one before it, or the run starts over. Checkpoints belong to one set of inputs (the stage's fingerprint); others are
ignored, so changing a Param never resumes an unrelated run.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from tasks.pipeline import storage
from tasks.training import adapter
from tasks.pipeline.artifacts import ADAPTER

log = logging.getLogger("gemma_pipeline")

KEEP = 2
# Inside the checkpoint folder: latest.json points at the newest step-<n>/, which holds the adapter,
# the optimizer's variables and state.json.
LATEST = "latest.json"
OPTIMIZER = "optimizer.npz"
BEST = "best.npz"  # with validation: the best step's trainable weights so far (keep: best)
STATE = "state.json"


class Checkpoints:
    def __init__(self, directory: Path, fingerprint: str):
        self.dir = Path(directory)
        self.fingerprint = fingerprint
        self.skipped: list[str] = []  # damaged checkpoints latest() removed

    def latest(self) -> dict | None:
        """The newest usable checkpoint of these inputs (its state, and `dir`), or None. A checkpoint
        whose files are truncated, changed or unreadable is skipped with a warning that names it,
        and the one before it is used (KEEP are kept), or none: the run starts over."""
        steps = sorted((p for p in self.dir.glob("step-*") if p.is_dir()), reverse=True) if self.dir.is_dir() else []
        skipped = self.skipped = []
        for directory in steps:
            state, problem = self._check(directory)
            if problem == "other inputs":
                log.warning("finetune: ignoring checkpoint %s: it belongs to other inputs", directory)
                continue
            if problem:
                log.warning("finetune: checkpoint %s is unusable, removing it: %s", directory, problem)
                skipped.append(directory.name)
                # Gone, so it never counts among the KEEP newest again.
                shutil.rmtree(directory, ignore_errors=True)
                continue
            if skipped:
                log.warning("finetune: resuming from the previous checkpoint, %s, instead of %s", directory.name, ", ".join(skipped))
            return {**state, "dir": str(directory)}
        if skipped:
            log.warning("finetune: no usable checkpoint left (%s unusable): starting over from step 0", ", ".join(skipped))
        return None

    def _check(self, directory: Path) -> tuple[dict | None, str | None]:
        """(state, None) for a usable checkpoint, else (None, why)."""
        try:
            state = storage.read_json(directory / STATE)
        except (OSError, ValueError) as exc:
            return None, f"{STATE} cannot be read ({type(exc).__name__}: {exc})"
        if state.get("fingerprint") != self.fingerprint:
            return None, "other inputs"
        problems = storage.hash_problems(directory, state.get("files", {}))
        if problems:
            return None, "; ".join(problems)
        try:
            import h5py
            import numpy as np

            with h5py.File(directory / ADAPTER, "r"):
                pass
            with np.load(directory / OPTIMIZER) as saved:
                saved.files  # noqa: B018 - reading the index is the check
        except Exception as exc:  # noqa: BLE001 - any unreadable file makes the checkpoint unusable
            return None, f"a file cannot be read ({type(exc).__name__}: {exc})"
        return state, None

    def save(self, step, lm, optimizer, history, base_scores, orders, train, validation=None) -> None:
        import numpy as np

        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:07d}"
        final = self.dir / name
        with storage.publishing(final) as tmp:
            adapter.save(lm, tmp / ADAPTER)
            np.savez(tmp / OPTIMIZER, *[np.asarray(v.numpy()) for v in optimizer.variables])
            if validation is not None and validation.best_weights is not None:
                np.savez(tmp / BEST, *validation.best_weights)
            files = storage.file_hashes(tmp)
            storage.write_json(
                tmp / STATE,
                {
                    "step": step,
                    "fingerprint": self.fingerprint,
                    "history": list(history),
                    "base_scores": base_scores,
                    "data_order": [[train[i]["id"] for i in order] for order in orders],
                    "optimizer_variables": [v.path for v in optimizer.variables],
                    "validation": validation.state() if validation is not None and validation.on else None,
                    # What resuming checks before trusting the files.
                    "files": files,
                },
            )
        storage.write_json(self.dir / LATEST, {"dir": name, "step": step, "fingerprint": self.fingerprint})
        for old in sorted(p for p in self.dir.glob("step-*") if p.is_dir())[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("finetune: checkpoint at step %d written to %s", step, final)

    def best_weights(self, state: dict) -> list | None:
        """The best validation step's weights a checkpoint holds (None without validation)."""
        import numpy as np

        file = Path(state["dir"]) / BEST
        if not file.is_file():
            return None
        with np.load(file) as saved:
            return [saved[f"arr_{i}"] for i in range(len(saved.files))]

    def restore(self, state: dict, lm, optimizer) -> None:
        import numpy as np

        directory = Path(state["dir"])
        adapter.load(lm, directory / ADAPTER, adapter.enabled_placement(lm))
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

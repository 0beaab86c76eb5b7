"""Experiment tracking and the model registry in MLflow: what each stage logs, and where.

One MLflow run per DAG run (its run folder) in an experiment named after the DAG; in a sweep, one
nested run per variant under it. Runs are found by their `gemma.run_key` tag (the run folder, plus
`/<variant>` for a variant), so a retried or rerun stage logs into the same run, and each piece is
logged once: the piece's tag `gemma.logged.<piece>` holds the fingerprint it was logged for.

    finetune  params (the resolved config), tags, per-step loss / accuracy / real tokens per second,
              history.json and the LoRA adapter                   -> the variant's run (the DAG run's without a sweep)
    generate  answers.json                                         -> the variant's run
    export    the export's manifest.json                           -> the DAG run's run
    report    every variant's evaluation metrics and gate checks (on its run), report.html and
              metrics.json (on the DAG run's run)
    promote   a new version of the registered model (named after the DAG) holding the champion's
              adapter (and its export manifest), alias `champion` moved to it, `previous-champion`
              on the one before

Tracking never costs a run: when the store is unreachable or locked, the stage logs a warning,
writes what it would have logged to `<run dir>/tracking/<piece>.json` (status `pending`) and goes
on; `python -m tasks.track --run-dir DIR` (or the stage rerun) logs what is missing. The same
file says `logged` with the MLflow run id once it is in. Secrets never reach MLflow: params are
config keys (no credentials among them), tags are fixed names, artifacts are the run's own files.

Where: `[gemma] mlflow_tracking_uri` (read by tasks.infra.settings: Airflow's config, then the env
variable GEMMA_MLFLOW_TRACKING_URI; the pods get it as env), else
an embedded SQLite store `sqlite:///<run root>/mlflow.db` with artifacts in `<run root>/mlartifacts/`.
`[gemma] mlflow_ui_url`, when set, makes the report link to the run.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from tasks.pipeline import artifacts, storage
from tasks.infra.settings import DAG_ID, redact, setting

log = logging.getLogger("gemma_pipeline")

# The experiment and the registered model are named after the DAG.
EXPERIMENT = DAG_ID
REGISTERED_MODEL = DAG_ID
CHAMPION_ALIAS, PREVIOUS_ALIAS = "champion", "previous-champion"
STATE_DIR = "tracking"  # <run dir>/tracking/<piece>.json: pending or logged
DB_FILE, ARTIFACT_DIR = "mlflow.db", "mlartifacts"


def run_root_of(run_dir: Path) -> Path:
    """<run root> from a run folder (<run root>/runs/<run>) or a variant's (<run>/variants/v<i>)."""
    run_dir = Path(run_dir).resolve()
    if run_dir.parent.name == "variants":
        run_dir = run_dir.parent.parent
    return run_dir.parent.parent


def tracking_uri(run_dir: Path) -> str:
    return setting("mlflow_tracking_uri") or f"sqlite:///{run_root_of(run_dir) / DB_FILE}"


def artifact_location(run_dir: Path) -> str | None:
    """Where a new experiment keeps its artifacts: beside the embedded store; a server decides its own."""
    return None if setting("mlflow_tracking_uri") else (run_root_of(run_dir) / ARTIFACT_DIR).as_uri()


def ui_url() -> str:
    return setting("mlflow_ui_url").rstrip("/")


def keys(run_dir: Path) -> tuple[Path, str, str]:
    """(the DAG run's folder, its key, this folder's key): a variant's folder is the DAG run's
    folder plus `/<variant>`."""
    run_dir = Path(run_dir).resolve()
    if run_dir.parent.name == "variants":
        top = run_dir.parent.parent
        return top, top.name, f"{top.name}/{run_dir.name}"
    return run_dir, run_dir.name, run_dir.name


def _state_path(top: Path, piece: str) -> Path:
    return top / STATE_DIR / f"{piece.replace('/', '.')}.json"


def _client(run_dir: Path):
    import mlflow

    uri = tracking_uri(run_dir)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


def _experiment_id(client, run_dir: Path) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=artifact_location(run_dir))
    except Exception:  # noqa: BLE001 - another task created it between the two calls
        return client.get_experiment_by_name(EXPERIMENT).experiment_id


def _find_or_create(client, exp_id: str, key: str, name: str, parent_id: str | None, tags: dict) -> Any:
    found = client.search_runs([exp_id], filter_string=f"tags.`gemma.run_key` = '{key}'", max_results=1)
    if found:
        return found[0]
    tags = {"gemma.run_key": key, "mlflow.runName": name, **tags}
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    return client.create_run(exp_id, tags=tags, run_name=name)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(top: Path) -> dict[str, str]:
    """Tags of the DAG run's MLflow run: where it came from, and the way back to Airflow."""
    tags = {"airflow.dag_id": DAG_ID, "airflow.run_folder": top.name, "gemma.git_commit": git_commit()}
    run_id = os.environ.get("AIRFLOW_CTX_DAG_RUN_ID")
    if run_id:
        tags["airflow.run_id"] = run_id
    base = setting("airflow_base_url") or os.environ.get("AIRFLOW__API__BASE_URL", "")
    if base and run_id:
        from urllib.parse import quote

        tags["airflow.report_url"] = f"{base.rstrip('/')}/gemma-reports/runs/{DAG_ID}/{quote(run_id, safe='')}"
    snap = artifacts.read_snapshot_manifest(top) if storage.completed(top, artifacts.SNAPSHOT) else None
    if snap:
        tags.update({"gemma.snapshot_sha256": snap["sha256"], "gemma.snapshot_revision": str(snap["revision"]),
                     "gemma.dataset": str(snap.get("dataset", ""))})
    return tags


def log_piece(run_dir: Path, piece: str, fingerprint: str, body, call: dict) -> dict:
    """Log one piece (`body(client, run, top_run)` does the logging) into the run of `run_dir`,
    once per fingerprint; never raises: a failure is a warning and a pending state file that holds
    `call` (this module's function and its JSON arguments), which `tasks.track` replays."""
    top, top_key, key = keys(run_dir)
    state_path = _state_path(top, piece if key == top_key else f"{piece}/{Path(run_dir).name}")
    try:
        client = _client(run_dir)
        exp_id = _experiment_id(client, run_dir)
        top_run = _find_or_create(client, exp_id, top_key, top_key, None, run_tags(top))
        run = top_run if key == top_key else _find_or_create(
            client, exp_id, key, Path(run_dir).name, top_run.info.run_id, {"gemma.variant": Path(run_dir).name})
        tag = f"gemma.logged.{piece}"
        fresh = client.get_run(run.info.run_id)
        if fresh.data.tags.get(tag) != fingerprint:
            body(client, fresh, top_run)
            client.set_tag(run.info.run_id, tag, fingerprint)
        state = {"status": "logged", "piece": piece, "key": key, "mlflow_run_id": run.info.run_id,
                 "top_run_id": top_run.info.run_id, "experiment_id": exp_id, "tracking_uri": redact(tracking_uri(run_dir)),
                 "fingerprint": fingerprint, "call": call, "at": time.time()}
    except Exception as e:  # noqa: BLE001 - tracking must never cost a training run
        log.warning("tracking: could not log %s to MLflow at %s (%s: %s); it is kept in %s, and "
                    "`python -m tasks.track --run-dir %s` logs it later", piece, redact(tracking_uri(run_dir)), type(e).__name__,
                    redact(str(e).splitlines()[0][:300]) if str(e) else "", state_path, top)
        state = {"status": "pending", "piece": piece, "key": key, "fingerprint": fingerprint,
                 "error": redact(f"{type(e).__name__}: {e}")[:1000], "tracking_uri": redact(tracking_uri(run_dir)), "call": call, "at": time.time()}
    state_path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_json(state_path, state)
    return state


# -- what each stage logs ----------------------------------------------------------------------------


def _params(client, run_id: str, cfg_dict: dict) -> None:
    from mlflow.entities import Param

    logged = client.get_run(run_id).data.params
    params = [Param(k, json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v))
              for k, v in sorted(cfg_dict.items()) if k not in logged]
    for start in range(0, len(params), 90):  # MLflow takes at most 100 params a batch
        client.log_batch(run_id, params=params[start : start + 90])


def _metrics(client, run_id: str, series: dict[str, list[tuple[int, float]]], at: int) -> None:
    from mlflow.entities import Metric

    items = [Metric(name, float(v), at, step) for name, pts in series.items() for step, v in pts if v == v]
    for start in range(0, len(items), 900):
        client.log_batch(run_id, metrics=items[start : start + 900])


def log_finetune(run_dir: str, fingerprint: str, params: dict) -> dict:
    """`params`: the variant's resolved config (Config.to_dict())."""
    run_dir = Path(run_dir)
    result, history = artifacts.read_finetune_result(run_dir), artifacts.read_history(run_dir)

    def body(client, run, _top):
        rid = run.info.run_id
        _params(client, rid, params)
        t = result["training"]
        device = result["device"]
        for k, v in {"gemma.base_preset": params["model_preset"], "gemma.train_mode": t["train_mode"],
                     "gemma.device": str(device.get("name") or device.get("kind") or device) if isinstance(device, dict) else str(device),
                     "gemma.dtype_policy": t["dtype_policy"], "gemma.xla": str(t["jit_compile"]),
                     **({"gemma.lora_targets": result["lora"]["targets"], "gemma.lora_layers": ",".join(result["lora"]["layers"])}
                        if "lora" in result else {}),
                     **({"gemma.kept_step": str(result["validation"]["kept_step"]),
                         "gemma.best_validation_step": str(result["validation"]["best_step"])}
                        if result.get("validation") else {})}.items():
            client.set_tag(rid, k, v[:5000])
        now = int(time.time() * 1000)
        _metrics(client, rid, {
            "loss": [(h["step"], h["loss"]) for h in history],
            "accuracy": [(h["step"], h["accuracy_running"]) for h in history],
            "real_tokens_per_s": [(h["step"], h["real_tokens_per_s"]) for h in history if "real_tokens_per_s" in h],
            # Scored before the first step too (step 0: the base model).
            "validation_loss": [(s["step"], s["loss"]) for s in (result.get("validation") or {}).get("scores", [])],
        }, now)
        _metrics(client, rid, {"trainable_weights": [(0, result["trainable_parameters"])]}, now)
        for name in ("heldout_base", "heldout_tuned"):
            _metrics(client, rid, {f"{name}.{k}": [(0, v)] for k, v in result[name].items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)}, now)
        client.log_artifact(rid, str(artifacts.path(run_dir, artifacts.FINETUNE, artifacts.HISTORY)))
        client.log_artifact(rid, str(artifacts.adapter_path(run_dir)), "adapter")

    return log_piece(run_dir, "finetune", fingerprint, body,
                     {"fn": "log_finetune", "kwargs": {"run_dir": str(run_dir), "fingerprint": fingerprint, "params": params}})


def log_generate(run_dir: str, fingerprint: str) -> dict:
    run_dir = Path(run_dir)

    def body(client, run, _top):
        client.log_artifact(run.info.run_id, str(artifacts.path(run_dir, artifacts.GENERATE, artifacts.ANSWERS)))

    return log_piece(run_dir, "generate", fingerprint, body,
                     {"fn": "log_generate", "kwargs": {"run_dir": str(run_dir), "fingerprint": fingerprint}})


def log_export(run_dir: str, fingerprint: str) -> dict:
    run_dir = Path(run_dir)

    def body(client, run, _top):
        client.log_artifact(run.info.run_id, str(artifacts.path(run_dir, artifacts.EXPORT, artifacts.MANIFEST)), "export")

    return log_piece(run_dir, "export", fingerprint, body,
                     {"fn": "log_export", "kwargs": {"run_dir": str(run_dir), "fingerprint": fingerprint}})


def evaluation_metrics(ev: dict) -> dict[str, float]:
    """The numbers of one evaluation (tasks.evaluate.evaluation) as flat MLflow metrics."""
    out: dict[str, float] = {}
    h, p = ev["heldout"], ev["perplexity"]
    for m in ("base", "tuned"):
        if h["rouge_l"].get(m) is not None:
            out[f"rouge_l.{m}"] = h["rouge_l"][m]
        if p.get(m) is not None:
            out[f"perplexity.{m}"] = p[m]
        out[f"eos_stop_rate.{m}"] = ev["eos_stop_rate"][m]
        out[f"template_leak_rate.{m}"] = ev["suite"][m]["template_leak_rate"]
    for name, ci in (("rouge_l_delta", h.get("rouge_l_delta_ci")), ("perplexity_delta", p.get("delta_ci"))):
        if ci:
            out.update({f"{name}.mean": ci["mean"], f"{name}.ci_low": ci["low"], f"{name}.ci_high": ci["high"]})
    for c in ev["gate"]["checks"]:
        out[f"gate.{c['name'].replace(' ', '_')}"] = 1.0 if c["passed"] else 0.0
    out["gate.passed"] = 1.0 if ev["gate"]["passed"] else 0.0
    return out


def log_report(run_dir: str, fingerprint: str) -> dict:
    """The DAG run's evaluation (the shown variant's, from metrics.json), report.html and
    metrics.json; in a sweep each finished variant's own numbers on its run too."""
    run_dir = Path(run_dir)
    metrics = artifacts.read_metrics(run_dir)

    def body(client, run, _top):
        rid, now = run.info.run_id, int(time.time() * 1000)
        _metrics(client, rid, {k: [(0, v)] for k, v in evaluation_metrics(metrics).items()}, now)
        client.set_tag(rid, "gemma.gate", "passed" if metrics["gate"]["passed"] else "failed")
        client.log_artifact(rid, str(artifacts.report_path(run_dir)))
        client.log_artifact(rid, str(artifacts.path(run_dir, artifacts.REPORT, artifacts.METRICS)))

    call = {"fn": "log_report", "kwargs": {"run_dir": str(run_dir), "fingerprint": fingerprint}}
    state = log_piece(run_dir, "report", fingerprint, body, call)
    for v in metrics.get("variants", []):
        if not v.get("name") or v.get("status") != "ok":
            continue

        def variant_body(client, run, _top, v=v):
            ci = v.get("rouge_l_delta_ci") or {}
            numbers = {"rouge_l.tuned": v.get("rouge_l"), "perplexity.tuned": v.get("perplexity"),
                       "eos_stop_rate.tuned": v.get("eos_stop_rate"), "heldout_loss.tuned": v.get("heldout_loss"),
                       "rouge_l_delta.ci_low": ci.get("low"), "rouge_l_delta.ci_high": ci.get("high"),
                       "gate.passed": 1.0 if v.get("gate_passed") else 0.0}
            _metrics(client, run.info.run_id, {k: [(0, x)] for k, x in numbers.items() if x is not None}, int(time.time() * 1000))
            client.set_tag(run.info.run_id, "gemma.gate", "passed" if v.get("gate_passed") else "failed")

        log_piece(run_dir / "variants" / v["name"], "evaluation", fingerprint, variant_body, call)
    return state


def register_champion(run_dir: str, variant_dir: str, fingerprint: str, export_manifest: str | None,
                      approval: dict | None = None) -> dict:
    """A new version of the registered model from the champion variant's logged adapter; `champion`
    moves to it and `previous-champion` to the version that held `champion`. A person's `approval`
    (who, when, why) goes into the version's and the run's tags."""
    result: dict = {}
    # What an earlier stage could not log (the adapter above all) goes in first.
    replay(Path(run_dir), skip=("registry",))

    def body(client, run, _top):
        import mlflow

        if "gemma.logged.finetune" not in run.data.tags:
            raise RuntimeError(f"the champion's adapter is not logged in MLflow run {run.info.run_id} yet")

        source = f"runs:/{run.info.run_id}/adapter"
        try:
            client.get_registered_model(REGISTERED_MODEL)
        except mlflow.exceptions.MlflowException:
            client.create_registered_model(REGISTERED_MODEL, description="LoRA adapters promoted by the quality gate")
        if export_manifest is not None:
            client.log_artifact(run.info.run_id, str(export_manifest), "adapter/export")
        tags = {"gemma.run_key": run.data.tags.get("gemma.run_key", "")}
        if approval:
            tags.update({"gemma.approved_by": str(approval.get("by")), "gemma.approved_at": str(approval.get("at")),
                         "gemma.approval_comment": str(approval.get("comment") or "")[:5000],
                         "gemma.triggered_by": str(approval.get("triggered_by"))})
            for k, v in tags.items():
                client.set_tag(run.info.run_id, k, v)
        version = client.create_model_version(REGISTERED_MODEL, source, run_id=run.info.run_id, tags=tags)
        try:
            previous = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION_ALIAS)
        except mlflow.exceptions.MlflowException:
            previous = None
        if previous is not None and previous.version != version.version:
            client.set_registered_model_alias(REGISTERED_MODEL, PREVIOUS_ALIAS, previous.version)
        client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION_ALIAS, version.version)
        result.update(registered_model=REGISTERED_MODEL, version=int(version.version),
                      previous_version=int(previous.version) if previous is not None else None)

    call = {"fn": "register_champion", "kwargs": {"run_dir": str(run_dir), "variant_dir": str(variant_dir),
                                                  "fingerprint": fingerprint, "export_manifest": export_manifest,
                                                  "approval": approval}}
    state = log_piece(Path(variant_dir), "registry", fingerprint, body, call)
    if state["status"] == "logged" and not result:
        # Registered by an earlier attempt: read the version back from the registry.
        try:
            client = _client(Path(run_dir))
            v = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION_ALIAS)
            result.update(registered_model=REGISTERED_MODEL, version=int(v.version), previous_version=None)
        except Exception:  # noqa: BLE001
            pass
    return {**state, **result}


def states(run_dir: Path) -> list[dict]:
    return [storage.read_json(p) for p in sorted((keys(run_dir)[0] / STATE_DIR).glob("*.json"))]


def replay(run_dir: Path, skip: tuple[str, ...] = ()) -> list[dict]:
    """Log every pending piece of a run again (what `python -m tasks.track` does)."""
    done = []
    for state in states(run_dir):
        if state["status"] != "logged" and state["piece"] not in skip:
            fn = REPLAYABLE.get(state["call"]["fn"])
            if fn is None:
                raise ValueError(f"{state['piece']}: tracking file names {state['call']['fn']!r}, which is not one of "
                                 f"the functions a pending piece may call ({', '.join(REPLAYABLE)})")
            done.append(fn(**state["call"]["kwargs"]))
    return done


# What a pending tracking file may call, by the name it records: tracking files written before the
# library moved into packages name these same functions.
REPLAYABLE = {fn.__name__: fn for fn in (log_finetune, log_generate, log_export, log_report, register_champion)}


def status(run_dir: Path) -> dict:
    """What the report says about tracking: where the run is, and what is still pending."""
    all_states = states(run_dir)
    logged = [s for s in all_states if s["status"] == "logged"]
    pending = [s for s in all_states if s["status"] != "logged"]
    top = logged[0] if logged else None
    run_id = top["top_run_id"] if top else None
    link = f"{ui_url()}/#/experiments/{top['experiment_id']}/runs/{run_id}" if top and ui_url() else None
    return {"tracking_uri": redact(tracking_uri(run_dir)), "experiment": EXPERIMENT, "run_id": run_id, "link": link,
            "logged": len(logged), "pending": [{"piece": s["piece"], "key": s["key"], "error": s.get("error", "")} for s in pending]}

"""First start: with an empty model store, put a model in it and promote it, so the stack serves at once.

The training worker queues the bootstrap task once when it starts (``XRAYFM_BOOTSTRAP``, see
:class:`xrayfm_stack.settings.TrainingSettings`):

- ``shipped`` (the default): publish the model shipped inside the library (``XRAYFM_BOOTSTRAP_MODEL``, by
  default ``xrayfm/cxr-vit-tiny-mae-pneumonia-lora``: LoRA on the MAE foundation, trained on real CC BY
  radiographs) into the store, with its ONNX graphs, and promote it; its foundation is stored once by
  content (``<store>/foundations/<sha256>/``, :mod:`xrayfm_training.publish`). No training:
  seconds. Its int8 verdict is measured on its validation images when a data folder
  (``XRAYFM_DATA_DIRS``) holds its dataset (Kermany train); else the version records that it was not.
- ``demo`` / ``quick`` (tiny, for tests): draw synthetic chest and bone phantoms (:mod:`xrayfm.data.synth`),
  pre-train a small ViT on the chest ones, LoRA-adapt it to the bone ones (both as ordinary training jobs,
  visible in ``/training/jobs``) and promote the adapter. What it serves says it is synthetic
  (``meta["data"]["synthetic"]``).
- ``off``: nothing is served until someone promotes a model.

Its state lives in one Redis hash (:class:`xrayfm_stack.jobs.BootstrapState`) that the gateway's ``/ready``
reads to say what is happening.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from xrayfm.errors import XrayfmError
from xrayfm.registry import PREFIX, pretrained_dir
from xrayfm_stack import store as model_store
from xrayfm_stack.jobs import TERMINAL, BootstrapState, JobRecords
from xrayfm_stack.settings import TrainingSettings
from xrayfm_stack.spec import validate_spec
from xrayfm_training.publish import publish_run

CHEST_LABELS = ["Cardiomegaly", "Pleural Effusion", "Lung Opacity"]
FOUNDATION_NAME, ADAPTED_NAME = "demo-chest-fm", "demo-bone-lora"


def demo_sizes(mode: str) -> dict[str, Any]:
    """Image count, size, model and epochs of the bootstrap job (the demo's sizes, or tiny ones)."""
    from xrayfm.train.demo import DemoSettings

    # demo: the sizes of `make demo` (its README table: LoRA study AUROC 0.675 on the bone phantoms); a
    # smaller budget (400 images, 8 + 5 epochs) served a LoRA model below chance (0.43) in one first start.
    s = DemoSettings.quick() if mode == "quick" else DemoSettings()
    images = 40 if mode == "quick" else s.chest_images
    return {"size": s.size, "images": images, "model": s.model, "model_kwargs": s.model_kwargs,
            "pretrain_epochs": s.pretrain_epochs, "adapt_epochs": s.adapt_epochs, "batch_size": s.batch_size,
            "pretrain_lr": s.pretrain_lr, "adapt_lr": s.adapt_lr, "seed": s.seed}  # fmt: skip


def store_is_empty(store: Path) -> bool:
    """True when nothing is promoted and no version is stored."""
    return model_store.serving(store) is None and not model_store.list_versions(store)


class Interrupted(Exception):
    """The worker is shutting down mid-bootstrap: the next worker carries on (not a failure)."""


def _finish(job_id: str, settings: TrainingSettings, records: JobRecords, run_job) -> dict[str, Any]:
    """Run the job here, or wait for the worker that runs it (a re-queued one); returns its final record."""
    while True:
        if run_job(job_id, settings, records).get("status") == "handed-back":
            raise Interrupted(f"job {job_id} handed back: the worker is shutting down")
        job = records.get(job_id) or {}
        if job.get("status") in TERMINAL:
            return job
        time.sleep(2.0)  # running elsewhere: wait for it (run_job waits on its lock, then sees it done)


def _job_spec(kind: str, name: str, root: Path, sizes: dict[str, Any], foundation: str | None) -> dict:
    common = {"size": sizes["size"], "batch_size": sizes["batch_size"], "seed": sizes["seed"],
              "progress_bar": False, "tensorboard": False, "log_every": 5}  # fmt: skip
    if kind == "pretrain":
        config = {"kind": "chexpert", "root": str(root), "labels": CHEST_LABELS, "model": sizes["model"],
                  "model_kwargs": sizes["model_kwargs"], "epochs": sizes["pretrain_epochs"],
                  "lr": sizes["pretrain_lr"], "val_fraction": 0.25, **common}  # fmt: skip
    else:
        config = {"kind": "mura", "root": str(root), "foundation": foundation, "method": "lora",
                  "epochs": sizes["adapt_epochs"], "lr": sizes["adapt_lr"], "augment": False,
                  "n_bootstrap": 50, "val_fraction": 0.25, **common}  # fmt: skip
    return {"kind": kind, "name": name, "config": config}


def install_shipped(store: Path, name: str, data_dirs: tuple[Path, ...] = ()) -> dict[str, str]:
    """Publish the shipped model `name` (``xrayfm/<name>``; an adapter's shipped foundation goes to the
    store's ``foundations/<sha256>/``, once) into the store as a new version of ``<name>``, with its ONNX
    graphs (int8 judged on its validation
    images when one of `data_dirs` holds its dataset); returns its {"name", "version"}."""
    short = name.removeprefix(PREFIX)
    version, _ = publish_run(
        store, short, pretrained_dir(name), job_id="first-start", kind="shipped", data_dirs=data_dirs
    )
    return {"name": short, "version": version}


def run_bootstrap(settings: TrainingSettings, records: JobRecords, run_job) -> dict[str, Any]:
    """Install the shipped model, or synthesise, pre-train and adapt (each job through `run_job`); then
    promote. Returns the final state."""
    state = BootstrapState(settings.redis_url, settings.queue)
    mode = (state.get() or {}).get("mode") or settings.bootstrap
    store = Path(settings.model_store)
    if model_store.serving(store) is not None:
        state.set(stage="done", model=model_store.serving(store))
        return state.get() or {}
    try:
        if mode == "shipped":
            state.set(stage="installing", model=settings.bootstrap_model, error=None)
            ref = install_shipped(store, settings.bootstrap_model, settings.data_dirs)
        else:
            ref = _train_demo(settings, records, run_job, state, mode, store)
        state.set(stage="promoting")
        model_store.promote(store, ref["name"], ref["version"])
        state.set(stage="done", model=ref, job_id=None)
    except Interrupted:
        raise  # left under way without a lock: the next worker's orphan check queues it again
    except Exception as exc:
        state.set(
            stage="failed",
            error=f"{type(exc).__name__}: {exc}" if isinstance(exc, XrayfmError) else type(exc).__name__,
        )
        raise
    return state.get() or {}


def _train_demo(
    settings: TrainingSettings, records: JobRecords, run_job, state: BootstrapState, mode: str, store: Path
) -> dict[str, Any]:
    """Synthesise the phantoms, pre-train on the chest ones, LoRA-adapt to the bone ones; the adapter's ref."""
    from xrayfm.data.synth import synth_bone, synth_chest

    sizes = demo_sizes(mode)
    data = (Path(settings.runs_dir) / "bootstrap-data").resolve()
    state.set(stage="synthesising", error=None)
    chest, bone = data / "CheXpert-synthetic", data / "MURA-synthetic"
    for root, make in ((chest, synth_chest), (bone, synth_bone)):
        if not (root / "SYNTHETIC.md").exists():
            make(root, n=sizes["images"], seed=sizes["seed"], size=sizes["size"], progress=False)
    ref: dict[str, Any] | None = None
    for stage, kind, name, root in (("pretraining", "pretrain", FOUNDATION_NAME, chest),
                                    ("adapting", "adapt", ADAPTED_NAME, bone)):  # fmt: skip
        foundation = f"store:{ref['name']}/{ref['version']}" if ref else None
        jobs = (state.get() or {}).get("jobs") or {}
        job_id = jobs.get(stage)  # an earlier, interrupted bootstrap's job: carry on with it
        if job_id is None or records.get(job_id) is None:
            job_id = records.create(
                validate_spec(_job_spec(kind, name, root, sizes, foundation), store, [data])
            )
        state.set(stage=stage, job_id=job_id, jobs={**jobs, stage: job_id})
        job = _finish(job_id, settings, records, run_job)
        if job.get("status") != "done":
            raise XrayfmError(f"{kind} job {job_id} ended {job.get('status')}: {job.get('error')}")
        ref = job["model"]
    assert ref is not None
    return ref

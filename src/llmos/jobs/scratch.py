"""The ``scratch`` job: train a small model from scratch on a dataset (``llmos train --from-scratch CONFIG``).

Contract: ``params`` is the config file's mapping: ``data`` (a dataset name), ``name`` (the output name), optional
``split`` (default: ``train`` when the rows carry splits), the model's shape (``arch`` gpt | lstm, ``layers``,
``d_model``, ``heads``, ``context``, ``hidden``, ``dropout``, ``seed``) and training settings (``epochs``,
``batch_size``, ``optimizer``, ``lr``, ``max_steps``, ``warmup_steps``, ``schedule``). The character tokenizer is
built from the training rows. Progress is the loss per step; the result is registered with lineage to the dataset
(``gpt`` models are Hugging Face checkpoints that the server can load). Not resumable: these models train in
minutes.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Any

from llmos.errors import InvalidInputError
from llmos.registry.datasets import load_rows, parent_of, rows_of_split
from llmos.registry.derive import register_derived
from llmos.registry.service import Registry
from llmos.training.checkpoints import make_private_dir
from llmos.training.scratch import create_model, row_text

if TYPE_CHECKING:
    from llmos.jobs.context import JobContext

SHAPE_KEYS = ("layers", "d_model", "heads", "context", "hidden", "dropout", "seed")
FIT_KEYS = ("epochs", "batch_size", "optimizer", "lr", "max_steps", "warmup_steps", "schedule", "seed")
KNOWN = {"arch", "data", "name", "split", "validation_split", *SHAPE_KEYS, *FIT_KEYS}


def run_scratch(context: JobContext) -> dict[str, Any]:
    from llmos.jobs.context import JobCancelled

    params = dict(context.params)
    unknown = sorted(set(params) - KNOWN)
    if unknown:
        raise InvalidInputError(f"unknown keys in the config: {', '.join(unknown)}; known: {', '.join(sorted(KNOWN))}")
    registry = Registry(context.settings, maintain=False)
    try:
        data_view, rows = load_rows(registry, str(params["data"]))
        has_splits = any("split" in row for row in rows)
        train = rows_of_split(rows, params.get("split") or ("train" if has_splits else None))
        validation = None
        if has_splits and any(row.get("split") == "validation" for row in rows):
            validation = rows_of_split(rows, params.get("validation_split") or "validation")
        texts = [row_text(row) for row in train]
        model = create_model(
            str(params.get("arch", "gpt")), texts=texts, **{k: params[k] for k in SHAPE_KEYS if k in params}
        )
        context.log(f"{model.arch} model with {model.parameter_count:,} parameters; {len(train)} training rows")
        fit_args = {k: params[k] for k in FIT_KEYS if k in params}
        epochs = int(fit_args.get("epochs", 1))
        batch = int(fit_args.get("batch_size", 16))
        total = int(fit_args.get("max_steps") or epochs * -(-len(train) // batch))

        def callback(event: dict[str, Any]) -> None:
            metrics = {k: float(v) for k, v in event.items() if k in ("loss", "lr", "val_loss", "epoch")}
            if "loss" in metrics and context.progress(int(event["step"]), total, metrics):
                raise JobCancelled(f"stopped at step {event['step']}")

        history = model.fit(train, validation_data=validation, callback=callback, **fit_args)
        output = context.directory / "output"
        shutil.rmtree(output, ignore_errors=True)
        make_private_dir(output)  # the trained weights, until they are registered (encrypted when the data is)
        model.save_pretrained(output)
        final = {"loss": history["loss"][-1], "steps": len(history["loss"])}
        if history.get("val_loss"):
            final["val_loss"] = history["val_loss"][-1]
        view = register_derived(  # the dataset's tenant and encryption carry over
            registry,
            [data_view],
            output,
            str(params["name"]),
            operation="train",
            params={"job": context.id, "config": params, "metrics": final, "dataset_digest": data_view.digest},
            lineage=[parent_of(data_view)],
            tenant_id=context.job.tenant_id,
        )
        shutil.rmtree(output, ignore_errors=True)
        return {"model": view.name, "digest": view.digest, "metrics": final}
    finally:
        registry.close()

"""Derivations keep a tenant's model the tenant's and encrypted (issue 17, items 1 and 2).

Acceptance: for every derivation kind, from a parent owned by tenant ``acme`` and encrypted at rest, the child belongs
to ``acme`` (another tenant gets the same 404 as for a missing model), every blob of the child starts with the
encryption header, no file anywhere under the llmos home is a plaintext GGUF or safetensors file afterwards, and the
child still loads and answers. A tiny random Llama makes the conversions take milliseconds; the real SmolLM2 is
quantized once and must still say Paris.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmos.api.auth import visible_view
from llmos.config import Settings
from llmos.errors import ConflictError, ModelNotFoundError
from llmos.formats.detect import inspect_path
from llmos.registry.compress import prune
from llmos.registry.convert import convert, quantize
from llmos.registry.datasets import store_rows
from llmos.registry.derive import derive
from llmos.registry.edge import export_bundle, import_bundle
from llmos.registry.service import Registry
from llmos.registry.views import VersionView
from llmos.sdk import load_model
from llmos.security.principal import Principal
from llmos.security.service import SecurityService
from llmos.store.crypto import MAGIC
from tests.helpers import gguf_bytes, make_tiny_bpe_llama, toy_qa_rows


@dataclass
class World:
    settings: Settings
    registry: Registry
    acme: Principal
    beta: Principal


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, smollm2_file: Path) -> Iterator[World]:
    """A home with an encryption key, tenants acme and beta, and acme's encrypted parents: a tiny Llama (safetensors),
    SmolLM2 (GGUF) and a dataset."""
    root = tmp_path_factory.mktemp("derive")
    settings = Settings(home=root / "home", encryption_key=os.urandom(32).hex())
    security = SecurityService(settings)
    ids = {}
    for tenant in ("acme", "beta"):
        security.create_tenant(tenant)
        ids[tenant] = security.tenant_id(tenant)
    security.close()
    registry = Registry(settings)
    acme = ids["acme"]
    tiny = make_tiny_bpe_llama(root / "tiny")
    registry.import_info(inspect_path(tiny), "tiny", tenant_id=acme, encrypt=True)
    registry.import_info(inspect_path(smollm2_file), "priv", tenant_id=acme, encrypt=True)
    store_rows(registry, toy_qa_rows(24), "acme-data", operation="import", report={}, tenant_id=acme)
    yield World(
        settings,
        registry,
        Principal(tenant="acme", tenant_id=acme, role="developer"),
        Principal(tenant="beta", tenant_id=ids["beta"], role="developer"),
    )
    registry.close()


def plaintext_models(home: Path) -> list[Path]:
    """Every regular file under ``home`` that is a plaintext GGUF or safetensors file."""
    found = []
    for directory, _, files in os.walk(home):
        for name in files:
            path = Path(directory) / name
            if path.is_symlink() or not path.is_file():
                continue
            with path.open("rb") as handle:
                head = handle.read(10)
            header_length = int.from_bytes(head[:8], "little") if len(head) == 10 else 0
            safetensors = head[8:10] == b'{"' and 0 < header_length < path.stat().st_size
            if head.startswith(b"GGUF") or safetensors:
                found.append(path)
    return found


def check_child(world: World, view: VersionView) -> None:
    registry = world.registry
    assert view.tenant_id == world.acme.tenant_id, f"{view.name} is not acme's"
    for file in view.files:
        with registry.blobs.path(file.digest).open("rb") as handle:
            assert handle.read(len(MAGIC)) == MAGIC, f"{view.name}: {file.path} is stored in plaintext"
    assert plaintext_models(world.settings.home) == []
    # acme sees it; beta gets the 404 of a model that does not exist, by name and in listings
    assert visible_view(world.acme, registry.show(view.name), view.name).digest == view.digest
    with pytest.raises(ModelNotFoundError):
        visible_view(world.beta, registry.show(view.name), view.name)
    listed = {v.name for v in registry.list_versions() if world.beta.may_see(v.tenant_id)}
    assert view.name not in listed


def test_every_derivation_kind_keeps_the_tenant_and_the_encryption(world: World) -> None:
    registry = world.registry
    gguf = convert(registry, "tiny", to="gguf", out_type="f16", target="tiny-gguf:f16")  # safetensors -> GGUF
    check_child(world, gguf)
    back = convert(registry, "tiny-gguf:f16", target="tiny-back:latest")  # GGUF -> safetensors, from an encrypted GGUF
    check_child(world, back)
    assert back.lineage[0].parent_digest == gguf.digest and back.format == "hf"
    for view in (
        quantize(registry, "tiny-gguf:f16", kind="q8_0", target="tiny-q8:latest"),  # a new name: no tenant given
        quantize(registry, "tiny", kind="int8", target="tiny-int8:latest"),
        prune(registry, "tiny", method="magnitude", sparsity=0.3, target="tiny-pruned:latest"),
    ):
        check_child(world, view)
        assert view.lineage[0].parent_name == "tiny:latest" or view.lineage[0].parent_digest == gguf.digest
    with load_model("tiny-back", settings=world.settings, pull=False) as model:  # the round trip still runs
        assert model.generate_text("double 12?", max_length=3, temperature=0, raw=True)
    # the real model: a quantized child of acme's encrypted SmolLM2 still answers
    child = quantize(registry, "priv", kind="q4_0", target="priv-q4:latest")
    check_child(world, child)
    with load_model("priv-q4", settings=world.settings, pull=False) as model:
        answer = model.generate_text("What is the capital of France?", max_length=8, temperature=0)
    assert "Paris" in answer
    assert plaintext_models(world.settings.home) == []  # the loads' decrypted copies are gone too


def test_a_training_job_child_belongs_to_the_owner_of_its_base_and_data(world: World) -> None:
    from llmos.jobs.context import JobContext
    from llmos.jobs.service import JobService
    from llmos.jobs.train import run_train

    jobs = JobService(world.settings)
    params = {
        "base": "tiny", "data": "acme-data", "name": "tiny-tuned:latest", "method": "lora", "max_steps": 2,
        "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 10, "eval_every": 100, "threads": 1, "lora_r": 4,
    }  # fmt: skip
    job = jobs.create("train", params, resource="train")  # a local job: no tenant of its own
    result = run_train(JobContext(jobs, job, world.settings))
    view = world.registry.show(result["model"])
    check_child(world, view)
    assert {item.parent_name for item in view.lineage} >= {"tiny:latest", "acme-data:latest"}


def test_tags_and_reimported_bundles_stay_with_the_tenant(world: World, tmp_path: Path) -> None:
    registry = world.registry
    source = tiny_q8(registry)
    tagged = registry.tag(source.name, "tiny-alias:prod")  # a new repository: owned like its source
    check_child(world, registry.show(tagged.name))
    public = tmp_path / "public.gguf"
    public.write_bytes(gguf_bytes())
    registry.import_info(inspect_path(public), "public-model", encrypt=True)  # public (encrypted: the scan stays clean)
    with pytest.raises(ConflictError, match="tenant"):
        registry.tag(source.name, "public-model:acme")  # never into a public model
    bundle = export_bundle(registry, source.name, tmp_path / "bundle").path  # a deliberate plaintext export
    back = import_bundle(registry, bundle, "tiny-reimported:latest").view
    check_child(world, back)


def test_parents_of_two_tenants_are_refused_and_the_scratch_is_private(world: World, tmp_path: Path) -> None:
    registry = world.registry
    model = tmp_path / "beta.gguf"
    model.write_bytes(gguf_bytes())
    theirs = registry.import_info(inspect_path(model), "beta-model", tenant_id=world.beta.tenant_id, encrypt=True)
    mine = registry.show("tiny")
    with pytest.raises(ConflictError, match="different tenants"):
        derive(registry, [mine, theirs], lambda _: pytest.fail("no work for refused parents"), "mixed:x", operation="x")
    seen: list[Path] = []

    def work(scratch: Path) -> Path:
        seen.append(scratch)
        assert scratch.stat().st_mode & 0o777 == 0o700 and scratch.parent == registry.scratch_dir
        (scratch / "child.gguf").write_bytes(gguf_bytes(metadata={"general.architecture": "llama", "x.y": 1}))
        return scratch / "child.gguf"

    child = derive(registry, [theirs], work, "beta-child:latest", operation="custom", params={"k": 1})
    assert child.tenant_id == world.beta.tenant_id and not seen[0].exists()
    assert [(item.operation, item.parent_digest, item.params) for item in child.lineage] == [
        ("custom", theirs.digest, {"k": 1})
    ]


def test_a_pipeline_may_evaluate_only_on_data_its_caller_sees(world: World) -> None:
    from llmos.errors import NotFoundError
    from llmos.jobs.pipeline import check_recipe, parse_recipe

    store_rows(
        world.registry, toy_qa_rows(4), "beta-data", operation="import", report={}, tenant_id=world.beta.tenant_id
    )
    recipe = {"name": "acme-bot", "base": "tiny", "data": "acme-data"}
    check_recipe(world.registry, parse_recipe({**recipe, "evaluate": {"data": "acme-data"}}), world.acme.may_see)
    with pytest.raises(NotFoundError, match="beta-data"):
        check_recipe(world.registry, parse_recipe({**recipe, "evaluate": {"data": "beta-data"}}), world.acme.may_see)


def test_plaintext_left_by_a_killed_process_is_removed_at_the_next_start(world: World) -> None:
    script = (
        "import sys, time; from pathlib import Path; from llmos.store.scratch import private_dir\n"
        "with private_dir(Path(sys.argv[1]), 'decrypted-') as d:\n"
        "    (d / 'model.gguf').write_bytes(b'GGUF plaintext'); print(d, flush=True); time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(world.registry.scratch_dir)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    leftover = Path(child.stdout.readline().strip())
    assert (leftover / "model.gguf").is_file()
    Registry(world.settings).close()  # a start while the owner lives keeps its directory
    assert leftover.is_dir()
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert leftover.is_dir()  # kill -9: nothing cleaned up
    Registry(world.settings).close()
    assert not leftover.exists()


def tiny_q8(registry: Registry) -> VersionView:
    """acme's q8_0 GGUF child of the tiny Llama (made by the first test; again when run alone)."""
    try:
        return registry.show("tiny-q8")
    except ModelNotFoundError:
        gguf = convert(registry, "tiny", to="gguf", out_type="f16", target="tiny-gguf:f16")
        return quantize(registry, gguf.name, kind="q8_0", target="tiny-q8:latest")

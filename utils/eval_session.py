"""One base model resident for a whole evaluation, adapters swapped onto it arm by arm, and the
check that every adapter arm belongs to that base before anything is generated."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from utils.adapter_shapes import BaseShapes, adapter_shape_problem
from utils.clean_model_loader import (
    CleanModelLoader,
    LoadedModel,
    attach_adapter,
    resolve_model,
    weights_hash,
)
from utils.eval_arms import ArmSpec, check_adapter_base
from utils.eval_config import EvalInputError, ModelSpec
from utils.process_memory import release_memory


class ModelSession:
    """At most one base model resident; adapters swapped onto it arm by arm.

    The first adapter wraps the model in a PeftModel (attach_adapter); later adapters are
    loaded next to it with load_adapter + set_adapter and the previous one is deleted; an arm
    without adapter on a wrapped model runs inside ``disable_adapter()``. The load is lazy, so
    a fully cached evaluation never loads a model.
    """

    def __init__(self, spec: ModelSpec, log: Callable[[str], None] = print):
        self.spec = spec
        self.lm: LoadedModel | None = None
        self.load_s: float | None = None
        self._log = log
        self._active: tuple[str, str] | None = None  # (peft adapter name, adapter dir)
        self._n_adapters = 0

    def weights_sha256(self) -> str:
        """The base weights hash, without loading the model when it is a local directory."""
        if self.lm is not None:
            return self.lm.provenance["weights_sha256"]
        _display, local = resolve_model(self.spec.name)
        if local is not None:
            return weights_hash(local)
        return self.load().provenance["weights_sha256"]

    def load(self) -> LoadedModel:
        if self.lm is None:
            self._log(f"loading base model {self.spec.name} ...")
            t0 = time.perf_counter()
            loader = CleanModelLoader(
                device=self.spec.device,
                dtype=self.spec.dtype,
                quantization=self.spec.quantization,
                trust_remote_code=self.spec.trust_remote_code,
                allow_instruct_control=self.spec.allow_instruct_control,
                attn_implementation=self.spec.attn_implementation,
            )
            self.lm = loader.load(self.spec.name)
            self.load_s = time.perf_counter() - t0
        return self.lm

    @property
    def loaded(self) -> bool:
        return self.lm is not None

    @contextmanager
    def arm(self, spec: ArmSpec) -> Iterator[LoadedModel]:
        lm = self.load()
        if spec.adapter_dir is None:
            if self._active is not None:
                with lm.model.disable_adapter():  # base weights only, adapter stays loaded
                    yield lm
            else:
                yield lm
            return
        name = f"arm{self._n_adapters}"  # peft module keys cannot contain user text like '.'
        self._n_adapters += 1
        previous = self._active
        attach_adapter(lm, spec.adapter_dir, adapter_name=name)
        self._active = (name, str(spec.adapter_dir))
        if previous is not None:
            self._drop(previous)
        yield lm

    def _drop(self, adapter: tuple[str, str]) -> None:
        name, directory = adapter
        assert self.lm is not None
        self.lm.model.delete_adapter(name)
        if directory in self.lm.adapters:
            self.lm.adapters.remove(directory)
        release_memory()

    def close(self) -> None:
        """Drop the model (and every adapter) and collect, so nothing stays resident."""
        self.lm = None
        self._active = None
        release_memory()


def check_adapters(specs: Sequence[ArmSpec], session: ModelSession) -> None:
    """Every adapter arm against the base BEFORE any generation: the manifest's base weights
    hash, then every LoRA tensor's shape against the base's config and weight shapes (headers
    only, utils/adapter_shapes.py), so a copied manifest on another model's adapter fails here."""
    dirs = [spec.adapter_dir for spec in specs if spec.adapter_dir is not None]
    if not dirs:
        return
    base_sha = session.weights_sha256()
    _display, local = resolve_model(session.spec.name)
    if local is not None:
        base = BaseShapes.from_dir(local)
    else:
        base = BaseShapes.from_model(session.load().model, session.spec.name)
    for adapter_dir in dirs:
        check_adapter_base(adapter_dir, base_sha)
        problem = adapter_shape_problem(adapter_dir, base)
        if problem:
            raise EvalInputError(problem)

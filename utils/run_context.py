"""What every stage script does around its own work: config, clean model, sentinels, manifest.

A stage script reads like::

    def main(argv=None) -> int:
        args = parse(argv)
        return stage_main("pairs", out_dir, lambda: run(args))   # exit codes: utils/errors.py

    def run(args) -> int:
        run = StageRun.start("pairs", args.config, args.overrides, out_dir)
        with as_input_error():                  # config parsing / input reading only
            cfg = PairsConfig.from_dict(section(run.cfg, "pairs"))
        ...                                     # stage logic from utils
        if nothing_kept:
            return run.skip("no pair kept: ...", counts=...)    # manifest skipped, exit 3
        run.finish(counts=...)                  # manifest ok
        return EXIT_OK

``stage_main`` turns a ``ProjectInputError`` into exit 2 and a ``GateError`` into exit 3, each
with a ``failed`` manifest, and writes a ``failed`` manifest (the traceback's last lines) for
any other exception before re-raising it (exit 1, traceback printed). Keeping this in one place
means every artifact gets the same provenance (loader provenance, sentinel verdict, config +
hash, git commit, package versions, timings) and the pipeline can trust ``status``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.clean_model_loader import CleanModelLoader, LoadedModel
from utils.config import load_config, section
from utils.errors import (
    EXIT_BAD_INPUT,
    EXIT_CRASH,
    EXIT_GATE,
    STATUS_FAILED,
    STATUS_OK,
    STATUS_SKIPPED,
    GateError,
    ProjectInputError,
    error_tail,
)
from utils.provenance import write_manifest


@dataclass
class StageRun:
    stage: str
    cfg: dict[str, Any]
    out_dir: Path
    t0: float = field(default_factory=time.perf_counter)
    lm: LoadedModel | None = None
    sentinel: dict[str, Any] | None = None
    generation_backend: dict[str, Any] | None = None

    @classmethod
    def start(
        cls,
        stage: str,
        config_path: str | None,
        overrides: list[str],
        out_dir: str | Path,
        sections: Sequence[str] = (),
    ) -> StageRun:
        """The recipe with ``sections`` (what the stage reads) and the ones ``load_model``
        reads (model, sentinels, generation) checked up front (``load_stage_config``)."""
        cfg = load_stage_config(
            config_path, overrides, ("model", "sentinels", "generation", *sections)
        )
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return cls(stage=stage, cfg=cfg, out_dir=out)

    def load_model(self) -> LoadedModel:
        # A missing, unreadable or refused model raises a ProjectInputError (exit 2).
        loader, name = CleanModelLoader.from_config(section(self.cfg, "model"))
        self.lm = loader.load(name)
        from utils.vllm_engine import attach_backend

        # generation.backend: the HF engine, or vLLM for the base model's sampling. Attached
        # before the sentinels run, so that they check the ids the stage's engine is fed.
        self.generation_backend = attach_backend(self.lm, self.cfg.get("generation"))
        self.sentinel = run_configured_sentinels(self.lm, self.cfg.get("sentinels", {}))
        return self.lm

    def finish(
        self, status: str = STATUS_OK, reason: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        """Write the stage's manifest (``status`` ok unless given) and return it."""
        return write_manifest(
            self.out_dir / "manifest.json",
            stage=self.stage,
            config=self.cfg,
            status=status,
            reason=reason,
            model=self.lm.provenance if self.lm else None,
            sentinels=self.sentinel,
            generation_backend=self.generation_backend,
            wall_time_s=round(time.perf_counter() - self.t0, 1),
            **fields,
        )

    def skip(self, reason: str, **fields: Any) -> int:
        """Nothing was kept (e.g. no pair): manifest ``skipped`` with the reason and the stage's
        numbers; returns ``EXIT_GATE``, which the pipeline tolerates for a skipped manifest."""
        self.finish(status=STATUS_SKIPPED, reason=reason, **fields)
        return EXIT_GATE

    def fail_gate(self, reason: str, **fields: Any) -> int:
        """A quality gate failed after the stage's work: manifest ``failed``; returns
        ``EXIT_GATE`` (the pipeline stops)."""
        self.finish(status=STATUS_FAILED, reason=reason, **fields)
        return EXIT_GATE


def load_stage_config(
    config_path: str | Path | None, overrides: Sequence[str], sections: Sequence[str]
) -> dict[str, Any]:
    """The recipe, with the ``sections`` a stage script reads checked (``check_sections``)."""
    cfg = load_config(config_path, overrides)
    check_sections(cfg, sections)
    return cfg


def check_sections(cfg: dict[str, Any], sections: Sequence[str]) -> None:
    """Check ``sections`` of the recipe by the rules the pipeline applies to the whole recipe
    before its first stage (utils/config_validation: types, ranges, the stage parsers' own
    rules): every bad ``section.key`` in one ``ConfigError`` (exit 2) before the stage does
    anything. A section the recipe lacks is left to the stage."""
    from utils.config_validation import check_config  # imports every stage's config class

    where = {"_config_path": cfg.get("_config_path", "config")}
    check_config(where | {s: cfg[s] for s in sections if s in cfg})


def write_failed_manifest(
    out_dir: str | Path, stage: str, reason: str, exit_code: int, **fields: Any
) -> None:
    """``<out_dir>/manifest.json`` with ``status: failed`` (not when even the parent of
    ``out_dir`` is missing); never raises: it runs while another error is being reported, and
    must not hide it."""
    out = Path(out_dir)
    if not out.parent.is_dir():  # e.g. a mistyped --run: create nothing there
        return
    try:
        out.mkdir(exist_ok=True)
        write_manifest(
            out / "manifest.json", stage=stage, config=None, status=STATUS_FAILED,
            reason=reason, exit_code=exit_code, argv=sys.argv, **fields,
        )  # fmt: skip
    except Exception as e:  # noqa: BLE001 - reported, the original error goes on
        print(f"[{stage}] could not write the failed manifest in {out_dir}: {e}", file=sys.stderr)


def stage_main(stage: str, out_dir: str | Path | None, body: Callable[[], int]) -> int:
    """Run a stage script's ``body`` with the shared exit handling (codes in utils/errors.py):
    bad input -> exit 2, failed gate -> exit 3 (each: one message line and a ``failed``
    manifest); any other exception (KeyboardInterrupt included) -> ``failed`` manifest with the
    traceback's last lines, then re-raised (Python prints the traceback, exit 1). With
    ``out_dir`` None no manifest is written (a script whose output folder depends on its config).
    """
    try:
        return body()
    except ProjectInputError as e:
        print(f"error: {e}", file=sys.stderr)
        if out_dir is not None:
            write_failed_manifest(out_dir, stage, f"bad input: {e}", EXIT_BAD_INPUT)
        return EXIT_BAD_INPUT
    except GateError as e:
        print(f"quality gate failed: {e}", file=sys.stderr)
        if out_dir is not None:
            write_failed_manifest(out_dir, stage, f"quality gate failed: {e}", EXIT_GATE)
        return EXIT_GATE
    except SystemExit:
        raise
    except BaseException as e:
        if out_dir is not None:
            reason = f"crash: {type(e).__name__}: {e}"
            write_failed_manifest(out_dir, stage, reason, EXIT_CRASH, traceback_tail=error_tail(e))
        raise
    finally:
        close_process_group()


def close_process_group() -> None:
    """Destroy the torch.distributed process group a torchrun stage opened (TRL/accelerate do
    not). Left open, a rank can exit while gloo's threads still run: "terminate called without
    an active exception", SIGABRT, and torchrun fails a stage that finished (KNOWN_BUGS 33)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run_configured_sentinels(lm: LoadedModel, sentinel_cfg: dict[str, Any]) -> dict[str, Any]:
    """Run the sentinel suite in the mode the config asks for and refuse a contaminated model.

    ``mode``: "off" records that nothing ran; "static" runs the token/template checks only;
    "probe" adds the weight probe (configs/quick.yaml); "quick" adds greedy behavioural probes
    (the load-time default). A "contaminated" verdict stops the stage (``ContaminationError``:
    exit 2, one line) unless the model was loaded as a positive control."""
    mode = sentinel_cfg.get("mode", "quick")
    if mode in ("off", False, None):  # YAML reads a bare `off` as False
        return {"mode": "off", "verdict": "not run"}
    from utils.contamination import run_sentinel_suite

    result = run_sentinel_suite(lm, {**sentinel_cfg, "mode": mode})
    verdict = result.get("verdict")
    print(f"[sentinels] mode={mode} verdict={verdict}", file=sys.stderr)
    if verdict == "contaminated" and not lm.provenance.get("positive_control"):
        from utils.clean_model_loader import ContaminationError

        raise ContaminationError(
            f"sentinel suite says {lm.provenance['model_id']!r} is contaminated: "
            f"{result.get('reasons', result)}. Refusing to produce results from it."
        )
    return result
